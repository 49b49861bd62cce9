"""Empirical neural tangent kernel of a task model with respect to a parameter selection.

Definitions follow ``THEORY.md`` ("Empirical NTK"). For inputs ``x_1..x_n`` and a model with ``o`` outputs
per example, the Jacobian rows are ``J(x_i) = ∂f(x_i; θ0)/∂θ_sel ∈ R^{o × p}`` (``p`` selected parameter
entries, default W_Q, W_K, W_V of every layer), and

    K[i, j, a, b] = <J(x_i)[a], J(x'_j)[b]>                                   (kernel="full")

Shapes of :attr:`NTKResult.kernel` (always ``torch.float64``, on the CPU):

==============  =====================  =====================================================
``kernel=``     shape                  entry
==============  =====================  =====================================================
``"full"``      ``(n1, n2, o1, o2)``   ``K[i, j, a, b]``
``"trace"``     ``(n1, n2)``           ``(1/o) · Σ_a K[i, j, a, a]``  (the *average*, not the sum)
``"diagonal"``  ``(n1, n2, o)``        ``K[i, j, a, a]``
==============  =====================  =====================================================

Outputs (``output=``): ``"logits"`` (``o`` = number of classes), ``"margin"`` (``o = 1``: true-class logit
minus the largest other logit), ``"loss"`` (``o = 1``: per-example cross-entropy). The last two need
``labels`` in the inputs.

Modes (``mode=``), all tested to agree (``tests/test_ntk.py``):

``"exact"``
    per-example Jacobians in chunks, from one batched forward and one backward per output when every
    selected tensor is a linear layer's weight or bias (per-example weight gradients from the layers' inputs
    and output gradients; checked on the first chunk against autograd), else from ``torch.func`` (``vmap``
    of ``jacrev`` of ``functional_call``). The Gram is accumulated in float64 tile by tile: float32 rows are
    multiplied in float32 over column blocks of at most ``2^18`` entries, each block's product added in
    float64; float64 rows in float64. What is kept between the gradient passes and the Gram
    (``schedule=``): with the batched engine, by default, each selected layer's inputs and output gradients
    (``"activations"``: per token ``d_in + o·d_out`` numbers instead of ``o·d_in·d_out`` per example), from
    which each parameter group's rows are formed when that group is multiplied; otherwise the Jacobian rows
    (``"jacobian"``), and when those do not fit in ``max_memory`` they are processed in row blocks and the
    column chunks recomputed, so memory stays bounded (time grows by about ``n / (2·block)`` extra gradient
    passes).
``"sketch"``
    the same per-example Jacobians projected on the fly, ``φ(x) = J(x) S / √k`` with ``S`` a ``p × k``
    Rademacher (default) or Gaussian matrix generated block by block from a seed derived from
    ``(seed, parameter name, group, block)``: ``S`` is never materialised, and every task sketched with the
    same seed (and device type) uses the same ``S``, so cross-task inner products are comparable.
    ``E[φφᵀ] = K``; the relative error decays as ``1/√k``.
``"reference"``
    NTK-vector products (a VJP to get ``J(x'_j)ᵀ e_b``, then a JVP over all of ``inputs1``): slow, for
    tests. Uses the model's ordinary forward (2-D padding mask), independently of the exact path.

The ``vmap`` path avoids the data-dependent mask helpers of transformers 5 (see ``RESOURCES.md``) by
passing a ready additive 4-D mask (``(1, 1, 1, L)`` per example for encoders, causal ``(1, 1, L, L)``
for decoders), which transformers returns as it is; pooling still uses the 2-D mask. Padding columns that
are masked in every example of a chunk are trimmed (exactly: they receive zero attention).

Numerics: model in its own dtype (fp32 by default; tests use float64), TF32 disabled while computing,
Grams accumulated in float64, results moved to the CPU.

With ``torch.distributed`` initialised (``torchrun``), exact kernels and sketched features are sharded over
the ranks and every rank returns the whole result (``_exact_distributed``, ``docs/ntk.md``).

Code layout (each module imports only the ones listed before it; the model-function helpers shared with
:mod:`taskvec.linearize` are in :mod:`taskvec.modelfn`, and run directories are read by
:mod:`taskvec.stages.ntk`):

``selection``   which parameters: :func:`select_params`.
``engines``     per-example gradient engines (:class:`~taskvec.ntk.engines.Engine`: batched, vmap) and the
                chunked Jacobian rows of one model (``_Jacobian``).
``gram``        float64 Gram tiles, triangle tiles of diagonal blocks, the CPU accumulator.
``schedules``   single-process exact schedules (:class:`~taskvec.ntk.schedules.Schedule`: activations,
                jacobian) and the memory budget (:func:`parse_bytes`, :func:`default_memory_budget`).
``distributed`` the process group, example shards, the distributed exact kernel.
``result``      :class:`NTKResult`, :func:`kernel_matrix`, :func:`convert_kernel`.
``sketch``      :class:`Projector`, :class:`Features`, :func:`jacobian_features`, the sketched kernel.
``reference``   NTK-vector products: :func:`model_outputs`, :func:`jvp_outputs`, :func:`output_gradient`.
``empirical``   :func:`empirical_ntk`.
"""

from ..modelfn import OUTPUTS, NTKError, additive_mask, as_batch, eval_mode, reduce_outputs, tf32_disabled
from .distributed import _computes as _computes
from .empirical import MODES, empirical_ntk
from .engines import ENGINES, Engine, batched_jacobian, vmap_jacobian
from .engines import _default_chunk as _default_chunk
from .engines import _Jacobian as _Jacobian
from .reference import jvp_outputs, model_outputs, output_gradient
from .result import KERNELS, NTKResult, convert_kernel, kernel_matrix
from .schedules import Schedule, default_memory_budget, parse_bytes
from .selection import select_params
from .sketch import PROJECTIONS, Features, Projector, jacobian_features

__all__ = [
    "ENGINES",
    "KERNELS",
    "MODES",
    "OUTPUTS",
    "PROJECTIONS",
    "Engine",
    "Features",
    "NTKError",
    "NTKResult",
    "Projector",
    "Schedule",
    "additive_mask",
    "as_batch",
    "batched_jacobian",
    "convert_kernel",
    "default_memory_budget",
    "empirical_ntk",
    "eval_mode",
    "jacobian_features",
    "jvp_outputs",
    "kernel_matrix",
    "model_outputs",
    "output_gradient",
    "parse_bytes",
    "reduce_outputs",
    "select_params",
    "tf32_disabled",
    "vmap_jacobian",
]
