"""Admin (adaptive model initialization) for Hugging Face BERT-family, Marian/BART and T5 models.

Functional API first, Trainer callback second (the Composer `apply_*` + algorithm pattern):

* [`apply_admin`]: wire ω into a model and initialise it (profiling, closed form or constant) -> [`AdminReport`];
* [`AdminCallback`]: the same inside `transformers.Trainer`, profiled on the Trainer's own first batches;
* [`export_vanilla`] / [`save_vanilla`]: fold ω into the weights for a stock checkpoint; [`load_admin`]: reload an
  Admin checkpoint exactly; [`paper_init`]: the from-scratch init of the paper's experiments;
* [`ADMIN_ARCHITECTURES`]: the residual-site table keyed by `config.model_type`.

References:
    Liu et al., "Understanding the Difficulty of Training Transformers", EMNLP 2020, arXiv:2004.08249.
    Liu et al., "Very Deep Transformers for Neural Machine Translation", arXiv:2008.07772.
"""

from .callback import AdminCallback
from .checkpoint import MARKER_KEY, load_admin
from .core import AdminReport, AdminSite, apply_admin, closed_form_omega, has_admin, omega_summary
from .export import AdminExportError, export_vanilla, save_vanilla
from .init import paper_init
from .sites import ADMIN_ARCHITECTURES, AdminArchitecture, StackSpec, SublayerSpec


__all__ = [
    "ADMIN_ARCHITECTURES",
    "MARKER_KEY",
    "AdminArchitecture",
    "AdminCallback",
    "AdminExportError",
    "AdminReport",
    "AdminSite",
    "StackSpec",
    "SublayerSpec",
    "apply_admin",
    "closed_form_omega",
    "export_vanilla",
    "has_admin",
    "load_admin",
    "omega_summary",
    "paper_init",
    "save_vanilla",
]
