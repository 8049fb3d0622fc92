"""The run log, RUN_DIR/log.zarr: the one definition of its layout.

The writer (sim/record/logbook.py), the reader (analysis/store.py) and the tests' fake writer all take the
names, dtypes and dimensions below from here, so the three cannot drift apart. Standard library
only: analysis imports this module without pulling in torch.

Layout (zarr v3, one store per run, written while training by every rank):

- Root attributes (ROOT_ATTRS): "laminar_log" (the format version, 1), "config" (nested dict),
  "code_version", "world_size", "placement" (block groups per rank), "dataset", "method",
  "num_blocks", "log_every", "align_every" (0 = no alignment pairs), "heldout_split",
  "num_classes". Writers build them with `root_attrs`.
- Root arrays (ROOT_ARRAYS): heldout_labels (image,) int64; heldout_index (image,) int64 (indices
  in the test split).
- Group "block{b}" (`block_group(b)`), attributes BLOCK_ATTRS: "block", "rank", "feature_dim",
  "grid", "channels", "has_loss", "weight_shape"; arrays along dimension "step" (SERIES): step
  int64, loss, score_pos, score_neg, update_norm, feedback_norm, step_seconds float32, bytes_sent
  int64, input_age, context_age float32 (free-running runs: the mean ages of the block's updates since
  the previous logged step; NaN otherwise), input_zero_fraction float32 (zeros in the block's input at
  that step) - the last three absent from older logs (ADDED_LATER); and ACTIVATIONS
  (step, image, feature), float16 or float32 as the config's log.dtype says.
- Group "block{b}/align" (ALIGN_GROUP; absent or empty for end-to-end methods), arrays along
  dimension "align" (ALIGN_ARRAYS): step int64, local_gradient (align, param) float32, bp_gradient
  (align, param) float32.

Both `step` arrays are filled with -1 and written last in each row: a row whose step is >= 0 is
complete in every other array, which is how a store still being written is read.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

STORE_NAME = "log.zarr"  # inside the run folder
VERSION_ATTR = "laminar_log"  # root attribute holding FORMAT_VERSION
FORMAT_VERSION = 1  # bump it on any change that a reader of the old layout would misread

# What a writer gives (the version is added by `root_attrs`), then the full set a reader requires.
ROOT_FIELDS = ("config", "code_version", "world_size", "placement", "dataset", "method", "num_blocks", "log_every",
               "align_every", "heldout_split", "num_classes")
ROOT_ATTRS = (VERSION_ATTR, *ROOT_FIELDS)
BLOCK_ATTRS = ("block", "rank", "feature_dim", "grid", "channels", "has_loss", "weight_shape")

# Dimension names, as stored in each array's zarr metadata.
DIM_STEP, DIM_IMAGE, DIM_FEATURE, DIM_ALIGN, DIM_PARAM = "step", "image", "feature", "align", "param"
ALIGN_GROUP = "align"  # inside each block group
NOT_WRITTEN = -1  # fill value of the step arrays: a row not yet (fully) written


@dataclass(frozen=True)
class ArraySpec:
    """One array of the store. `dtypes` are those the format allows; writers use the first unless
    the config picks another (only the activations offer a choice)."""
    name: str
    dims: tuple[str, ...]  # the first is the dimension the array grows along
    dtypes: tuple[str, ...]  # numpy dtype names
    fill_value: int | None = None  # None: zarr's default (0)

    @property
    def dtype(self) -> str:
        return self.dtypes[0]

    @property
    def integer(self) -> bool:
        """Whether the array holds integers (readers check the kind, not the width)."""
        return self.dtype.startswith(("int", "uint"))

    def pick(self, dtype: str | None = None) -> str:
        """The dtype to write: `dtype` if the format allows it for this array, else a ValueError."""
        if dtype is None:
            return self.dtype
        if dtype not in self.dtypes:
            raise ValueError(f"the log format stores {self.name!r} as one of {list(self.dtypes)}, not {dtype!r}")
        return dtype


HELDOUT_LABELS = ArraySpec("heldout_labels", (DIM_IMAGE,), ("int64",))
HELDOUT_INDEX = ArraySpec("heldout_index", (DIM_IMAGE,), ("int64",))
ROOT_ARRAYS = (HELDOUT_LABELS, HELDOUT_INDEX)

STEP = ArraySpec("step", (DIM_STEP,), ("int64",), fill_value=NOT_WRITTEN)
SCALARS = tuple(ArraySpec(name, (DIM_STEP,), (dtype,)) for name, dtype in (
    ("loss", "float32"), ("score_pos", "float32"), ("score_neg", "float32"), ("update_norm", "float32"),
    ("feedback_norm", "float32"), ("step_seconds", "float32"), ("bytes_sent", "int64"), ("input_age", "float32"),
    ("context_age", "float32"), ("input_zero_fraction", "float32")))
# Scalars that older logs lack (before free-running runs and accounting, issues 24 and 25): read as NaN there
ADDED_LATER = ("input_age", "context_age", "input_zero_fraction")
SERIES = (STEP, *SCALARS)  # one value per logged step
ACTIVATIONS = ArraySpec("activations", (DIM_STEP, DIM_IMAGE, DIM_FEATURE), ("float16", "float32"))
BLOCK_ARRAYS = (*SCALARS, ACTIVATIONS, STEP)  # in writing order: step last

ALIGN_STEP = ArraySpec("step", (DIM_ALIGN,), ("int64",), fill_value=NOT_WRITTEN)
LOCAL_GRADIENT = ArraySpec("local_gradient", (DIM_ALIGN, DIM_PARAM), ("float32",))
BP_GRADIENT = ArraySpec("bp_gradient", (DIM_ALIGN, DIM_PARAM), ("float32",))
GRADIENTS = (LOCAL_GRADIENT, BP_GRADIENT)
ALIGN_ARRAYS = (*GRADIENTS, ALIGN_STEP)  # in writing order: step last


def block_group(block: int) -> str:
    """The path of block `block`'s group inside the store."""
    return f"block{block}"


def align_group(block: int) -> str:
    """The path of block `block`'s gradient pairs inside the store."""
    return f"{block_group(block)}/{ALIGN_GROUP}"


def root_attrs(**fields: Any) -> dict[str, Any]:
    """The root attributes of a new store: every name of ROOT_FIELDS, and no other, plus the version.

    Passing `laminar_log` is allowed only with the current FORMAT_VERSION, so a dict this returns can
    be passed through it again.
    """
    version = fields.pop(VERSION_ATTR, FORMAT_VERSION)
    if version != FORMAT_VERSION:
        raise ValueError(f"{VERSION_ATTR} = {version!r}: this code writes log format version {FORMAT_VERSION}")
    missing = [name for name in ROOT_FIELDS if name not in fields]
    unknown = sorted(set(fields) - set(ROOT_FIELDS))
    if missing or unknown:
        raise ValueError(f"log root attributes: missing {missing}, unknown {unknown}; the format takes exactly "
                         f"{list(ROOT_FIELDS)} (sim/record/log_format.py)")
    return {VERSION_ATTR: FORMAT_VERSION, **{name: fields[name] for name in ROOT_FIELDS}}
