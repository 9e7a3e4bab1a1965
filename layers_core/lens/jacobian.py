"""The Jacobian lens (Gurnee et al., 2026) as a ``Lens``, through TransformerLens's ``JacobianLens``.

TransformerLens fits and stores the lens (one ``d × d`` matrix ``J`` per block, in the reference
implementation's ``.pt`` artifact format) and this module only reads it: layer ℓ's residual is
transported by ``J``, then decoded like the model's own last layer (final norm → unembedding →
head transform), ``W_U · norm(J h)``.

Layer convention: TransformerLens's J-lens layer ``l`` is the output of block ``l``, which is this
project's layer ``l + 1``. The format has no matrix for the embeddings (this project's layer 0)
and none for the last block (its transport is the identity), so layer 0 is decoded as the logit
lens (``ln_final`` of the embeddings) and layer n as the model itself; ``per_layer`` marks which
transport decoded each layer.
"""

from __future__ import annotations

import copy
import os
import pickle
from dataclasses import dataclass, field, replace
from typing import Any, ClassVar

from torch import Tensor

from layers_core.errors import first_line
from layers_core.lens.protocol import describe_plan, plan_warnings
from layers_core.lens.tuned import DAMAGED_FILE_ERRORS
from layers_core.lens.views import single_file_in
from layers_core.norm_utils import apply_norm_or_skip

ARTIFACT_SUFFIX = ".pt"
_FINGERPRINT_KEYS = ("config_hash", "unembed_hash")
_MODEL_NAME_KEYS = ("model_name", "model_revision")  # TL's name check, replaced by the fingerprint
NO_MATRIX_EMBEDDINGS = "none: the format has no matrix for the embeddings (logit lens)"
IDENTITY_LAST = "identity: the last block's output is the model's own"


def artifact_name(clean_name: str) -> str:
    """``<model>_jacobian_lens.pt``, the reference implementation's file naming."""
    return f"{clean_name}_jacobian_lens{ARTIFACT_SUFFIX}"


def default_lens_dir(clean_name: str) -> str:
    """The per-model lens cache: ``<cache root>/jacobian-lens/<name>``."""
    from layers_core.model.loading import default_cache_root

    return os.path.join(default_cache_root(), "jacobian-lens", clean_name)


@dataclass(frozen=True)
class JacobianLensReader:
    """A fitted ``transformer_lens.tools.analysis.JacobianLens`` read as this project's ``Lens``
    (``bind(model)`` attaches the final norm and checks the lens fits the model)."""

    lens: Any  # transformer_lens.tools.analysis.JacobianLens
    final_norm: Any = field(default=None, compare=False, repr=False)
    n_layers: int = 0
    fingerprint: dict | None = field(default=None, compare=False)
    path: str | None = field(default=None, compare=False)
    name: ClassVar[str] = "jacobian"

    @classmethod
    def load(cls, path: str) -> JacobianLensReader:
        """Reads an artifact (a fit of ``fit_lens.py --kind jacobian`` or a published one)."""
        from transformer_lens.tools.analysis import JacobianLens

        artifact = single_file_in(path, ARTIFACT_SUFFIX)
        if artifact is None:
            raise FileNotFoundError(f"no Jacobian lens at {path} (a .pt file, or a directory holding one)")
        try:
            lens = JacobianLens.load(artifact)
        except DAMAGED_FILE_ERRORS as error:
            # not torch's advice (weights_only=False would run whatever code the file holds)
            detail = "" if isinstance(error, pickle.UnpicklingError) else f": {first_line(error)[:160]}"
            raise ValueError(f"{artifact}: not a readable Jacobian lens ({type(error).__name__}{detail}); "
                             "refit it with fit_lens.py --kind jacobian") from error
        recorded = {key: lens.metadata.get(key) for key in _FINGERPRINT_KEYS}
        fingerprint = recorded if all(recorded.values()) else None
        return cls(lens, fingerprint=fingerprint, path=artifact)

    def bind(self, model: Any) -> JacobianLensReader:
        """This lens with ``model``'s final norm, after TransformerLens's own checks (a raw
        Bridge, the same ``d_model``, source layers in range, the final-layer target). The
        recorded model *name* is not compared where the lens carries this project's fingerprint
        (the config and W_U hashes, checked after binding): a moved model keeps its lens."""
        lens = self.lens
        if self.fingerprint is not None:  # every other check still runs, on a copy without the name
            lens = copy.copy(self.lens)
            lens.metadata = {key: value for key, value in self.lens.metadata.items()
                             if key not in _MODEL_NAME_KEYS}
        lens.validate_model(model)
        return replace(self, final_norm=getattr(model, "ln_final", None), n_layers=int(model.cfg.n_layers))

    def source_layer(self, layer: int) -> int | None:
        """The J-lens layer (block output) of this project's ``layer``, or None (no matrix)."""
        source = layer - 1
        return source if source in self.lens.jacobians else None

    def translate(self, residual: Tensor, layer: int) -> Tensor:
        """``J h`` (float32) where the lens has a matrix for ``layer``, else ``h``; cast back."""
        source = self.source_layer(layer)
        if source is None:
            return residual
        return self.lens.transport(residual, source).to(residual.dtype)

    def transform(self, residual: Tensor, layer: int) -> Tensor:
        """Transport, then the final norm (``bind`` first)."""
        if self.n_layers == 0:
            raise ValueError("JacobianLensReader.transform needs the model: call lens.bind(model)")
        return apply_norm_or_skip(self.translate(residual, layer), self.final_norm, None, "ln_final")

    def transports(self) -> list[str]:
        """What decoded each layer 0..n: ``J[l]``, or why no matrix did."""
        marks = []
        for layer in range(self.n_layers + 1):
            source = self.source_layer(layer)
            if source is not None:
                marks.append(f"J[{source}]")
            elif layer == 0:
                marks.append(NO_MATRIX_EMBEDDINGS)
            elif layer == self.n_layers:
                marks.append(IDENTITY_LAST)
            else:
                marks.append("none: not fitted for this layer (logit lens)")
        return marks

    def per_layer(self) -> list[dict]:
        rows = describe_plan([(self.final_norm, "ln_final")] * (self.n_layers + 1))
        return [{**row, "transport": mark} for row, mark in zip(rows, self.transports())]

    @property
    def warnings(self) -> list[str]:
        return plan_warnings([(self.final_norm, "ln_final")])


def load_for_model(path: str | None, lm: Any) -> JacobianLensReader:
    """The registry's loader: the artifact at ``path`` (default: this model's lens cache)."""
    return JacobianLensReader.load(path or default_lens_dir(lm.source.clean_name))


def fit_prompts(tokenizer: Any, tokens: Any, n_prompts: int, max_seq_len: int) -> list[str]:
    """``n_prompts`` prompts of ``max_seq_len`` tokens taken from the token stream ``tokens``
    (``lens.tuned.token_stream``; after ``pipeline.fit.evaluation_split``'s held-out text),
    decoded back to text (``JacobianLens.fit`` takes strings). ``ValueError`` if too short."""
    from layers_core.lens.tuned import take_chunks

    chunks = take_chunks(tokenizer, tokens, max_seq_len, n_prompts * max_seq_len)
    if len(chunks) < n_prompts:
        raise ValueError(f"the corpus holds only {len(chunks)} chunks of {max_seq_len} tokens after the held-out "
                         f"text; need {n_prompts} prompts")
    return [tokenizer.decode(chunk) for chunk in chunks]
