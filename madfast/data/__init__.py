"""Data for teacher training and evaluation only (MAD itself is data-free); never downloaded."""

from madfast.data.datasets import DATASETS, DatasetInfo, Normalize, build_dataset, dataset_info, folder_index
from madfast.data.digits import digits_dataset

__all__ = ["DATASETS", "DatasetInfo", "Normalize", "build_dataset", "dataset_info", "digits_dataset", "folder_index"]
