"""Training: the token reader, the loop Ray Train runs on every worker, and the driver that starts it.

driver.py      check_before_ray, run_training: the TorchTrainer around the loop (the MLflow run, the datasets)
loop.py        train_loop_per_worker: setup -> train -> save -> cleanup, as a recipe
session.py     what the loop asks of its driver: Ray Train's workers, or one Tune trial
sweep.py       run_sweep: the Tune driver (trials run the same recipe), MLflow parent + nested trial runs;
               sweep_plots.py: metric vs each setting, parallel coordinates
step.py        one optimizer step's gradient: the per-token mean loss over micro-batches and workers
optim.py       AdamW parameter groups, warm-up + cosine schedule, the guarded step, autocast dtype
validation.py  validation loss; samples.py: rank 0's periodic WAV + spectrogram samples
checkpoints.py model.pt (what generate loads) and the training state a resume restores
dataset.py     token Parquet -> Ray Data -> padded batches; tracking.py: MLflow; distributed.py: DDP helpers
"""
