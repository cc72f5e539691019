"""Class-incremental DomainNet (345 classes, 5 tasks of 69, all six domains mixed) on ViT-B/16.

accelerate launch recipes/domainnet.py --output_dir outputs/domainnet
"""

from hyperlora.training.recipe import run

DEFAULTS = {
    "dataset_name": "wltjr1007/DomainNet",
    "label_column": "y",
    "num_tasks": 5,
    "num_train_epochs": 5,
    "per_device_train_batch_size": 64,
    "per_device_eval_batch_size": 256,
    "learning_rate": 1e-3,
    "augment": True,
    "report_to": "all",
    "output_dir": "outputs/domainnet",
}

if __name__ == "__main__":
    run(DEFAULTS)
