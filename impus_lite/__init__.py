"""impus_lite: diffusion-based image morphing (IMPUS, ICLR 2024), one small module per idea.

    from impus_lite import load_model, morph, MorphConfig
    model = load_model("classroom")          # or a Stable Diffusion hub id on a GPU
    result = morph(model, "a.png", "b.png", prompt="a photo of an animal",
                   config=MorphConfig.preset("fast", frames=9))
    result.save("morph.gif")
"""

__version__ = "0.1.0"

# Before anything imports torch: waiting OpenMP threads sleep instead of spinning, so several
# morphs can share a machine (see impus_lite.threads).
from .threads import prepare_environment as _prepare_environment  # noqa: E402

_prepare_environment()

from .config import MorphConfig  # noqa: E402
from .errors import ImpusError, InputError, ModelLoadError  # noqa: E402
from .models import load_model  # noqa: E402
from .morph import Morpher, MorphResult  # noqa: E402
from .dispatch import morph  # noqa: E402

__all__ = ["MorphConfig", "Morpher", "MorphResult", "morph", "load_model",
           "ImpusError", "InputError", "ModelLoadError", "__version__"]
