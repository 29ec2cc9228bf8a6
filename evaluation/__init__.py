"""Evaluation on the coordinator's held-out data, and the run report (docs/evaluation.md).

Modules (import the one you need; nothing heavy is imported here):

metrics of image sets, each beside a real-vs-real floor
- set_metrics: the quantities, which are headline, ``ReferenceScorer``
- bootstrap: bias-corrected percentile intervals over images
- laplacian_swd, power_spectrum, tissue_intensity, random_features, density_coverage:
  one metric family each
- degradations, metric_sanity: the sanity suite a headline metric must pass
- memorisation: nearest-neighbour copy detection against training images
- metric_panel: the evaluator's per-site panel of all of the above

the coordinator's evaluator
- evaluator: ``Evaluator`` (prepare / evaluate / write_sample_grid / write_info)
- feature_metrics, networks: FD_medgenenc-v1 and KID on the trained encoder (not headline)
- image_metrics, translation, utility, adaptation: paired and downstream metrics

the report
- report: ``write_report(run_dir)``; report_summary, report_sections, report_evaluation,
  report_compare, report_cli (``medgen report RUN [RUN ...]``), run_files, html_parts,
  svg_charts, sample_grid
"""
