"""Evaluation on the coordinator's held-out data, and the run report (docs/evaluation.md).

Modules (import the one you need; nothing heavy is imported here):
- evaluator: ``Evaluator`` (prepare / evaluate / write_sample_grid / write_info)
- feature_metrics: Frechet distance (MONAI FIDMetric) and KID with a bootstrap interval
- image_metrics: PSNR, SSIM, MAE inside a mask, Dice per tissue class
- networks: the feature extractor and site classifier trained on heldout/fit
- report: ``write_report(run_dir)`` -> self-contained HTML
"""
