"""The machinery of train.py and eval_linear.py that a reader of the method can skip.

config (defaults, presets, command line, value checks), data and batch_augment (datasets, crops),
batches (seeded, resumable batches), memory_bank, checkpoint (run state, resume), launch (process
group, device, banner), faults (test-only fault points), evaluation (train.py's kNN monitor and
demo table), probes (features, kNN, linear probe), backbones (networks, joint BN, build_smog: the
model around them), export (a checkpoint's backbone as a plain state_dict). Imports run one way:
entry points -> these modules -> smog.py, which imports nothing of the project.
"""
