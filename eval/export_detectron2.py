"""Export a ResNet backbone.pth to detectron2's checkpoint format, for running the detection
transfer with detectron2 elsewhere (MoCo's detection/configs, e.g. pascal_voc_R_50_C4_24k_moco.yaml).

    python -m eval.export_detectron2 RUN/backbone.pth RUN/backbone_d2.pkl

Names follow MoCo's convert-pretrain-to-detectron2 conversion: stem weights go under "stem."
("conv1" -> "stem.conv1", "bn1" -> "stem.conv1.norm"), layer1..4 become res2..res5, bnK the
norm of convK ("conv1.norm"), downsample.0/.1 the shortcut conv and its norm. The pickle holds
{"model": {name: numpy array}, "__author__": ..., "matching_heuristics": True}; detectron2 reads
a .pkl with "__author__" as a ready checkpoint. Our ResNets are torchvision's (stride in the 3x3
conv, RGB input in [0, 1] normalised by ImageNet mean/std), so the detectron2 config needs
RESNETS.STRIDE_IN_1X1 False, INPUT.FORMAT "RGB" and PIXEL_MEAN/PIXEL_STD 255 x ImageNet's,
as MoCo's configs set them.
"""
import argparse
import pickle
import re
import sys

import torch

from common import flags
from common.backbones import infer_arch


def detectron2_name(key):
    """detectron2 name of a torchvision ResNet state-dict key."""
    if not key.startswith("layer"):
        key = "stem." + key
    key = re.sub(r"layer(\d)", lambda m: f"res{int(m.group(1)) + 1}", key)
    key = re.sub(r"bn(\d)", r"conv\1.norm", key)
    return key.replace("downsample.0", "shortcut").replace("downsample.1", "shortcut.norm")


def to_detectron2(state_dict, author="semantic-pairs"):
    """The detectron2 checkpoint dict of a ResNet state dict (every key renamed, arrays unchanged)."""
    model = {detectron2_name(k): v.detach().cpu().numpy() for k, v in state_dict.items()}
    if len(model) != len(state_dict):
        raise ValueError("two keys map to the same detectron2 name")
    return {"model": model, "__author__": author, "matching_heuristics": True}


def main(argv=None):
    parser = flags.Parser("python -m eval.export_detectron2", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", help="a backbone.pth of a torchvision ResNet")
    parser.add_argument("output", help="the detectron2 checkpoint to write (.pkl)")
    args = parser.parse_args(argv)
    state = torch.load(args.checkpoint, map_location="cpu", weights_only=True)
    arch, _ = infer_arch(state)
    if arch not in ("resnet50", "resnet18"):
        sys.exit(f"error: {args.checkpoint} holds a {arch} backbone; detectron2's format covers ResNets only")
    with open(args.output, "wb") as f:
        pickle.dump(to_detectron2(state), f)
    print(f"wrote {args.output}: {len(state)} {arch} tensors in detectron2 naming")


if __name__ == "__main__":
    main()
