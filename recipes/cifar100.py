"""Class-incremental CIFAR-100 (10 tasks of 10 classes) on ViT-B/16, images upsampled to 224 px.

accelerate launch recipes/cifar100.py --output_dir outputs/cifar100
"""

from hyperlora.training.recipe import run

DEFAULTS = {
    "dataset_name": "uoft-cs/cifar100",
    "image_column": "img",
    "label_column": "fine_label",
    "num_tasks": 10,
    "num_train_epochs": 10,
    "per_device_train_batch_size": 64,
    "per_device_eval_batch_size": 256,
    "learning_rate": 1e-3,
    "augment": True,
    "report_to": "all",
    "output_dir": "outputs/cifar100",
}

if __name__ == "__main__":
    run(DEFAULTS)
