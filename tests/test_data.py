"""Local ImageFolder data end to end: a made-up two-class folder trains a teacher, which a MAD run
then distills and evaluates on the folder's val split (no download, no real data needed)."""

import os

import torch
from PIL import Image

from madfast.data import build_dataset, dataset_info
from madfast.train import DistillConfig, TeacherConfig, distill, train_teacher


def make_image_folder(root, classes=("bright", "dark"), per_class=12, size=20):
    """train/ and val/ of solid-ish images whose class is their brightness: learnable in an epoch."""
    g = torch.Generator().manual_seed(0)
    for split in ("train", "val"):
        for k, name in enumerate(classes):
            os.makedirs(os.path.join(root, split, name))
            for i in range(per_class):
                level = 200 if k == 0 else 40
                pixels = (level + torch.randint(-30, 30, (size, size, 3), generator=g)).clamp(0, 255).to(torch.uint8)
                Image.fromarray(pixels.numpy()).save(os.path.join(root, split, name, f"{i}.png"))
    return str(root)


def test_image_folder_layout_is_read_and_trains_a_teacher(tmp_path):
    data = make_image_folder(tmp_path / "data")
    info = dataset_info("imagefolder", data, 16)
    assert info.num_classes == 2 and info.img_size == 16
    train, test = build_dataset("imagefolder", "train", data, 16), build_dataset("imagefolder", "test", data, 16)
    assert len(train) == 24 and len(test) == 24 and train[0][0].shape == (3, 16, 16)
    summary = train_teacher(TeacherConfig(dataset="imagefolder", data_dir=data, img_size=16, model="small_cnn",
                                          epochs=8, batch_size=8, optimizer="adam", lr=3e-3, weight_decay=0.0,
                                          device="cpu", num_workers=0, progress=False, out=str(tmp_path / "t")))
    assert os.path.isfile(tmp_path / "t" / "teacher.pt")
    assert summary["test_acc"] > 75  # brightness is easy: well above the 50% of chance
    run = distill(DistillConfig(dataset="imagefolder", data_dir=data, img_size=16, teacher="small_cnn",
                                teacher_ckpt=str(tmp_path / "t" / "teacher.pt"), student="small_cnn_half", nz=16,
                                ngf=8, batch_size=8, steps=2, g_pretrain_steps=1, s_steps=1, out=str(tmp_path / "s"),
                                log_every=1, eval_every=0, ckpt_every=0, tensorboard=False, progress=False,
                                num_workers=0, device="cpu"))
    assert run["finished"] and run["student_acc"] is not None and run["teacher_acc"] == summary["test_acc"]
