"""One video on several GPUs: guidance-parallel (the guidance passes of a step at once, one group of GPUs each)
and Ulysses sequence-parallel (the tokens of one forward split over a group) sampling, run by a pack of worker
processes that the sampler drives from ComfyUI's process (docs/ARCHITECTURE.md, "Multi-GPU sampling")."""
