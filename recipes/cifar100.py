"""Class-incremental CIFAR-100 (10 tasks of 10 classes) on ViT-B/16, images upsampled to 224 px.

accelerate launch recipes/cifar100.py --output_dir outputs/cifar100
"""

from common import run

DEFAULTS = {
    "dataset": "uoft-cs/cifar100",
    "image_column": "img",
    "label_column": "fine_label",
    "num_tasks": 10,
    "num_epochs": 10,
    "batch_size": 64,
    "eval_batch_size": 256,
    "learning_rate": 1e-3,
    "augment": True,
    "report_to": "all",
    "output_dir": "outputs/cifar100",
}

if __name__ == "__main__":
    run(DEFAULTS)
