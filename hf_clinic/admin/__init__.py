"""Admin (adaptive model initialization) for Hugging Face BERT-family, Marian/BART and T5 models.

Functional API first, Trainer callback second (the Composer `apply_*` + algorithm pattern):

* [`apply_admin`]: wire ω into a model and initialise it (profiling, closed form or constant) -> [`AdminReport`];
* [`AdminCallback`]: the same inside `transformers.Trainer`, profiled on the Trainer's own first batches;
* [`export_vanilla`] / [`save_vanilla`]: fold ω into the weights for a stock checkpoint; [`load_admin`]: reload an
  Admin checkpoint exactly; [`paper_init`]: the from-scratch init of the paper's experiments;
* [`ADMIN_ARCHITECTURES`]: the residual-site table keyed by `config.model_type`; [`find_residual_sites`] locates
  the sites on a model (for analysis tools such as `hf_clinic.diagnostics`).

References:
    Liu et al., "Understanding the Difficulty of Training Transformers", EMNLP 2020, arXiv:2004.08249.
    Liu et al., "Very Deep Transformers for Neural Machine Translation", arXiv:2008.07772.
"""

from .callback import AdminCallback
from .checkpoint import MARKER_KEY, load_admin
from .core import (
    AdminReport,
    AdminSite,
    apply_admin,
    clear_residual_captures,
    closed_form_omega,
    has_admin,
    omega_summary,
)
from .export import AdminExportError, export_vanilla, save_vanilla
from .init import paper_init
from .sites import (
    ADMIN_ARCHITECTURES,
    OMEGA_NAME,
    AdminArchitecture,
    ResidualSite,
    StackSpec,
    SublayerSpec,
    find_residual_sites,
    resolve_architecture,
)


__all__ = [
    "ADMIN_ARCHITECTURES",
    "MARKER_KEY",
    "OMEGA_NAME",
    "AdminArchitecture",
    "AdminCallback",
    "AdminExportError",
    "AdminReport",
    "AdminSite",
    "ResidualSite",
    "StackSpec",
    "SublayerSpec",
    "apply_admin",
    "clear_residual_captures",
    "closed_form_omega",
    "export_vanilla",
    "find_residual_sites",
    "has_admin",
    "load_admin",
    "omega_summary",
    "paper_init",
    "resolve_architecture",
    "save_vanilla",
]
