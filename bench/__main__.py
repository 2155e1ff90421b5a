"""`python -m bench [--quick] [...]`: AGILLM vs Llama (`bench.compare_llama`, see it for the options).
`python -m bench decoding [--quick] [...]`: parallel decoding vs AR greedy (`bench.decoding`).
`python -m bench moe [--quick] [...]`: MoE training throughput vs transformers' Mixtral / Qwen3-MoE (`bench.moe`).
`python -m bench mtp [--quick] [...]`: MTP speculative decoding vs plain greedy, models trained on CPU (`bench.mtp`).
`python -m bench moe_routing [--quick] [...]`: token vs document routing, expert specialisation (`bench.moe_routing`).
`python -m bench kv_table [--quick] [...]`: KV-cache bytes/token and held-out perplexity per cache (`bench.kv_table`).
`python -m bench vqvae [--quick] [...]`: the VQ-VAE image tokenizer on held-out real images (`bench.vqvae`).
`python -m bench multimodal [--quick] [...]`: the multimodal AGILLM's held-out accuracies (`bench.multimodal`).
`python -m bench cpu_decode [--quick] [...]`: SmolLM2-135M CPU decode, fp32/bf16/int8/int4 vs roofline (`bench.cpu_decode`).
`python -m bench scale_out`: TP / EP / PP / FSDP2 / DeepSpeed ZeRO / disk offload vs one process (`bench.scale_out`).
`python -m bench fused_cross_entropy [--quick] [...]`: chunked linear cross-entropy vs stock, memory (`bench.fused_cross_entropy`).
`python -m bench quantized_kv [--quick] [--perplexity]`: decode over an int8/int4 KV cache (`bench.quantized_kv`).
`python -m bench moe_kernels [--quick] [...]`: MoE experts kernel agillm_grouped vs stock, CPU (`bench.moe_kernels`).
`python -m bench attention_kernels [--quick]`: attn_implementation="agillm" vs stock attention on CPU (`bench.attention_kernels`).
`python -m bench verify_and_draft [--quick] [...]`: single-forward staged decoding vs AR greedy (`bench.verify_and_draft`).
`python -m bench async_workers [--quick] [...]`: DiLoCo (torchft) vs DDP at equal compute, PP generate (`bench.async_workers`).
"""

import sys

from . import compare_llama, cpu_decode, decoding, kv_table, moe, moe_routing, mtp, multimodal, quantized_kv, scale_out, vqvae
from . import moe_kernels
from . import fused_cross_entropy
from . import attention_kernels
from . import verify_and_draft
from . import async_workers


if __name__ == "__main__":
    if sys.argv[1:2] == ["attention_kernels"]:
        attention_kernels.main(sys.argv[2:])
    elif sys.argv[1:2] == ["decoding"]:
        decoding.main(sys.argv[2:])
    elif sys.argv[1:2] == ["moe"]:
        moe.main(sys.argv[2:])
    elif sys.argv[1:2] == ["mtp"]:
        mtp.main(sys.argv[2:])
    elif sys.argv[1:2] == ["moe_routing"]:
        moe_routing.main(sys.argv[2:])
    elif sys.argv[1:2] == ["kv_table"]:
        kv_table.main(sys.argv[2:])
    elif sys.argv[1:2] == ["vqvae"]:
        vqvae.main(sys.argv[2:])
    elif sys.argv[1:2] == ["multimodal"]:
        multimodal.main(sys.argv[2:])
    elif sys.argv[1:2] == ["cpu_decode"]:
        cpu_decode.main(sys.argv[2:])
    elif sys.argv[1:2] == ["scale_out"]:
        scale_out.main(sys.argv[2:])
    elif sys.argv[1:2] == ["fused_cross_entropy"]:
        fused_cross_entropy.main(sys.argv[2:])
    elif sys.argv[1:2] == ["quantized_kv"]:
        quantized_kv.main(sys.argv[2:])
    elif sys.argv[1:2] == ["moe_kernels"]:
        moe_kernels.main(sys.argv[2:])
    elif sys.argv[1:2] == ["verify_and_draft"]:
        verify_and_draft.main(sys.argv[2:])
    elif sys.argv[1:2] == ["async_workers"]:
        async_workers.main(sys.argv[2:])
    else:
        compare_llama.main()
