"""Training AGILLM across processes and hosts with maintained engines.

- `scale_out.diloco`: async side workers, DiLoCo / Streaming DiLoCo on torchft (AGILLM's layer groups as the
  fragments that are synchronised at different times), against synchronous data-parallel training (torch DDP).

Layer ranges on different processes for inference use transformers' own pipeline parallelism
(`from_pretrained(..., distributed_config=DistributedConfig(pp_size=2))`, see README "Scale out").
"""
