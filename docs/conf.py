"""Sphinx configuration of the course site (docs/build.sh copies it into the source tree)."""

import impus_lite

project = "impus_lite"
author = "impus_lite contributors"
copyright = "impus_lite contributors"
release = impus_lite.__version__

extensions = [
    "myst_nb",                 # Markdown pages and the executed notebooks
    "sphinx.ext.autodoc",      # the API reference, from the docstrings
    "sphinx-mathjax-offline",  # MathJax served from _static: no page needs the network
]

# The notebooks arrive executed (docs/prepare.py): Sphinx only renders them.
nb_execution_mode = "off"
nb_output_stderr = "remove"    # progress bars and library warnings; errors are outputs of their own
nb_merge_streams = True
nb_ipywidgets_js = {}          # widget views were replaced by what they showed (prepare.py)
myst_enable_extensions = ["dollarmath", "amsmath", "colon_fence", "html_image"]
myst_heading_anchors = 3
suppress_warnings = ["myst.header", "mystnb.unknown_mime_type", "misc.highlighting_failure"]

autodoc_member_order = "bysource"
autodoc_typehints = "description"
autodoc_default_options = {"members": True, "show-inheritance": True}

exclude_patterns = ["_build", "**.ipynb_checkpoints"]
html_theme = "sphinx_book_theme"
html_title = "impus_lite: image morphing with diffusion models"
html_static_path = ["_static"]
html_css_files = ["site.css"]
html_theme_options = {
    "repository_url": "https://github.com/impus-lite/impus_lite",
    "use_repository_button": True,
    "show_toc_level": 2,
    "home_page_in_toc": True,
}
html_last_updated_fmt = None


# Most docstrings are reStructuredText; a few are plain prose that docutils misreads (|x| as a
# substitution, an indented formula as a block quote). Those are shown as written, in a literal
# block, rather than as error messages in the page.
import io  # noqa: E402
import re  # noqa: E402

from docutils import nodes  # noqa: E402
from docutils.core import publish_doctree  # noqa: E402

SPHINX_ROLE = re.compile(r":[\w:.-]+:(?=`)")


def _problems(lines) -> bool:
    messages = io.StringIO()
    doctree = publish_doctree(SPHINX_ROLE.sub("", "\n".join(lines)), settings_overrides={
        "report_level": 2, "halt_level": 5, "warning_stream": messages})
    return bool(messages.getvalue()) or any(m["level"] >= 2 for m in doctree.findall(nodes.system_message))


def _indent(line: str) -> int:
    return len(line) - len(line.lstrip())


def _literal_after_colons(lines):
    """Plain-text style: an indented block after a line that ends with ':' is code."""
    out = []
    for i, line in enumerate(lines):
        following = next((n for n in lines[i + 1:] if n.strip()), None)
        if (line.rstrip().endswith(":") and not line.rstrip().endswith("::") and following is not None
                and _indent(following) > _indent(line)):
            out.append(line.rstrip() + ":")
            if i + 1 < len(lines) and lines[i + 1].strip():
                out.append("")
        else:
            out.append(line)
    return out


def _plain_if_unreadable(app, what, name, obj, options, lines):
    if not _problems(lines):
        return
    fixed = _literal_after_colons(lines)
    if not _problems(fixed):
        lines[:] = fixed
    else:
        lines[:] = [".. code-block:: text", "   :class: docstring-plain", ""] + ["   " + line for line in lines] + [""]


def setup(app):
    app.connect("autodoc-process-docstring", _plain_if_unreadable)
