"""The benchmark harness: times training.loop.train_step on SDXL, SD 1.5 and FLUX.1-dev architectures at each
stack's settings, counts FLOPs per step, and writes bench/results/ and the tables in bench/README.md."""
