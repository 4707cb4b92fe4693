"""The training clinic: diagnose why a Transformer is hard to train, and show it in plots.

* [`measure_amplification`]: the output change |F(x, W) − F(x, W + δ)| under a small random perturbation δ, per
  residual sublayer and in total; [`residual_dependency`]: each residual sublayer's β_{i,i}² = Var[F_i]/Var[b_i];
  [`probe`]: both from the same forward passes. Any model of the Admin site table, vanilla or with Admin.
* [`ClinicCallback`]: the above, per-layer update-to-weight ratios, optimizer telemetry and clip statistics during a
  `Trainer` run, with plain-language findings ([`Finding`], thresholds in [`ClinicThresholds`]) and a clinic log.
* [`write_report`]: the HTML report of a run directory (also `hf-clinic report RUN_DIR`);
  [`diagnose_model`]: vanilla vs Admin profile of a model (also `hf-clinic diagnose MODEL_OR_CONFIG`).

References:
    Liu et al., "Understanding the Difficulty of Training Transformers", EMNLP 2020, arXiv:2004.08249.
"""

from .callback import ClinicCallback, ClinicWarning, layer_groups
from .clinic_log import LOG_NAME, ClinicLogError, read_run
from .diagnose import DiagnoseResult, diagnose_model
from .measures import (
    Amplification,
    ResidualDependency,
    SiteAmplification,
    SiteDependency,
    branch_parameters,
    measure_amplification,
    probe,
    residual_dependency,
)
from .report import write_report
from .signatures import ClinicThresholds, Finding


__all__ = [
    "LOG_NAME",
    "Amplification",
    "ClinicCallback",
    "ClinicLogError",
    "ClinicThresholds",
    "ClinicWarning",
    "DiagnoseResult",
    "Finding",
    "ResidualDependency",
    "SiteAmplification",
    "SiteDependency",
    "branch_parameters",
    "diagnose_model",
    "layer_groups",
    "measure_amplification",
    "probe",
    "read_run",
    "residual_dependency",
    "write_report",
]
