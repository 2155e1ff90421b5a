"""DiffusionBlocks training mode and Euler sampler (being written)."""


def diffusion_blocks_training_step(model, inputs, labels, **kwargs):
    raise NotImplementedError("DiffusionBlocks training is being written")


def diffusion_euler_generate(model, *args, **kwargs):
    raise NotImplementedError("The DiffusionBlocks Euler sampler is being written")
