"""Class-incremental ImageNet-R (200 classes, 10 tasks of 20 by default; 5 and 20 with --num_tasks) on ViT-B/16.

ImageNet-R has no official split: 20% of every class is held out with --split_seed (written to protocol.json).

    accelerate launch recipes/imagenet_r.py --output_dir outputs/imagenet_r
    accelerate launch recipes/imagenet_r.py --dataset_name /data/imagenet-r --weights in21k_ft_in1k --num_tasks 20
"""

from hyperlora.training.recipe import run

DEFAULTS = {
    "dataset_name": "axiong/imagenet-r",
    "label_column": "wnid",
    "train_split": "test",  # the Hub copy ships everything as one split
    "test_split": None,
    "num_tasks": 10,
    "num_train_epochs": 20,
    "per_device_train_batch_size": 64,
    "per_device_eval_batch_size": 256,
    "learning_rate": 1e-3,
    "augment": True,
    "report_to": "all",
    "output_dir": "outputs/imagenet_r",
}

if __name__ == "__main__":
    run(DEFAULTS)
