"""Which published benchmark each metric key matches, and how its numbers differ from ours (data)."""
from __future__ import annotations

# key family (the key before "@") -> what each benchmark calls it and whether the numbers are comparable.
# Sources were read at the commits listed in /work/shared/docs/field.md, plus
# Harvard-AI-and-Robotics-Lab/FiVE-Bench evaluation/metrics_calculator.py @ 2825ec1.

BENCHMARKS: dict[str, list[dict[str, str]]] = {
    "warp_error": [
        {"benchmark": "TokenFlow (Geyer et al., ICLR'24), Table 1", "name": "warp error", "comparable": "no",
         "difference": "RAFT flow; the evaluation script is unreleased (omerbt/TokenFlow#35, #49)",
         "source": "paper §5; field.md §2a"},
        {"benchmark": "VidToMe (CVPR'24), Table 1", "name": "Warp Err.", "comparable": "no",
         "difference": "RAFT flow", "source": "paper"},
        {"benchmark": "StreamV2V (ICLR'25), Table 1", "name": "warp error", "comparable": "no",
         "difference": "RAFT; mean |diff| of uint8 frames (wraps modulo 256), other occlusion mask",
         "source": "Jeff-LiangF/streamv2v tools/warp_error.py"},
    ],
    "clip_text_alignment": [
        {"benchmark": "TokenFlow, Table 1", "name": "CLIP score (edit fidelity)", "comparable": "with the same CLIP",
         "difference": "model not stated in the released code", "source": "paper §5"},
        {"benchmark": "V2VBench", "name": "Frames Text Alignment", "comparable": "x100 and model=openai/clip-vit-large-patch14",
         "difference": "reports logit_scale (100) x cosine", "source": "wenhao728/awesome-diffusion-v2v v2vbench/clip_text_alignment.py"},
        {"benchmark": "FiVE-Bench", "name": "CLIP score", "comparable": "no",
         "difference": "torchmetrics CLIPScore = 100 max(cos, 0), ViT-L/14, optionally on the masked edit region",
         "source": "FiVE-Bench evaluation/metrics_calculator.py"},
        {"benchmark": "RAVE / VidToMe", "name": "CLIP-T / Text CLIP", "comparable": "with ViT-B/32",
         "difference": "openai clip package preprocessing", "source": "RehgLab/RAVE evaluation_uncleaned/eval_utils.py"},
    ],
    "clip_frame_consistency": [
        {"benchmark": "FateZero / Rerender / FRESCO / Fairy", "name": "Tem-Con", "comparable": "with ViT-B/32",
         "difference": "openai clip package preprocessing",
         "source": "ChenyangQiQi/FateZero CLIP/frame_acc_tem_con.py"},
        {"benchmark": "StreamV2V / FlowVid / TokenFlow", "name": "CLIP consistency", "comparable": "with ViT-B/32",
         "difference": "none known (HF openai/clip-vit-base-patch32, projected embeddings)",
         "source": "Jeff-LiangF/streamv2v tools/clip_score.py"},
        {"benchmark": "V2VBench", "name": "CLIP consistency", "comparable": "no",
         "difference": "unprojected pooler_output of CLIPVisionModel, clamped at 0, ViT-L/14",
         "source": "v2vbench/clip_consistency.py"},
    ],
    "clip_frame_consistency_all_pairs": [
        {"benchmark": "RAVE (CVPR'24)", "name": "CLIP-F", "comparable": "with ViT-B/32",
         "difference": "openai clip package preprocessing", "source": "RehgLab/RAVE evaluation_uncleaned/eval_utils.py"},
    ],
    "clip_frame_consistency_first": [
        {"benchmark": "none", "name": "-", "comparable": "-",
         "difference": "a diagnostic of drift away from the first frame", "source": "-"},
    ],
    "structure_distance": [
        {"benchmark": "FiVE-Bench (ICCV'25) / PIE-Bench", "name": "Structure Distance", "comparable": "no",
         "difference": "same construction (DINO ViT-B/8 last-layer keys, cosine self-similarity incl. CLS, MSE); "
                       "FiVE resizes with torchvision Resize(224, max_size=480) and feeds 0-255 pixels to the "
                       "ImageNet normalisation (no /255); per frame, not per video",
         "source": "FiVE-Bench evaluation/metrics_calculator.py (LossG.calculate_global_ssim_loss)"},
    ],
    "dino_consistency": [
        {"benchmark": "V2VBench", "name": "DINO consistency", "comparable": "with facebook/dinov2-base, nearly",
         "difference": "V2VBench resizes to 256 and centre-crops 224 (BitImageProcessor); we resize the short side "
                       "to `size` without cropping", "source": "v2vbench/dino_consistency.py"},
    ],
    "track_epe": [
        {"benchmark": "FiVE-Bench", "name": "Motion Fidelity Score", "comparable": "no",
         "difference": "CoTracker tracks on a grid, cosine of displacement directions; ours: OpenCV LK tracks of "
                       "Shi-Tomasi corners, endpoint distance in pixels (lower is better)",
         "source": "FiVE-Bench evaluation/metrics_calculator.py (MotionFidelityScore)"},
        {"benchmark": "V2VBench", "name": "Motion Alignment", "comparable": "no",
         "difference": "-EPE between GMFlow flows of edit and source (dense flow, not tracks)",
         "source": "v2vbench/motion_alignment.py"},
    ],
    "background_psnr": [
        {"benchmark": "FiVE-Bench", "name": "PSNR (unedited part)", "comparable": "no",
         "difference": "FiVE zeroes the object pixels and takes PSNR over the whole frame (zeros count as "
                       "perfect pixels, so its values are higher); ours: MSE over background pixels only",
         "source": "FiVE-Bench evaluation/evaluate.py (psnr_unedit_part)"},
    ],
    "background_ssim": [
        {"benchmark": "FiVE-Bench", "name": "SSIM (unedited part)", "comparable": "no",
         "difference": "torchmetrics SSIM over the whole frame with object pixels zeroed; ours: mean local SSIM "
                       "over background pixels whose 11x11 window avoids the object",
         "source": "FiVE-Bench evaluation/evaluate.py (ssim_unedit_part)"},
    ],
}
