"""MkDocs hook: the benchmark results and their dated logs live in `bench/` beside the scripts that produce
them (and the changelog sits at the root); this adds them to the site under the same paths, so links to
`bench/RESULTS.md` work on the site and
in the repository alike."""

from __future__ import annotations

from pathlib import Path

from mkdocs.structure.files import File

ROOT = Path(__file__).resolve().parents[1]


# The import name of the repository's folders (`tracecore.tasks` is `tasks/`, mapped by setuptools'
# package-dir): a tree of links under it lets mkdocstrings read the sources statically, without importing.
SOURCE_TREE = ROOT / ".docs-src" / "tracecore"
PACKAGES = ("flows", "tasks", "kernels", "storage", "configs")


def on_startup(command, dirty):
    SOURCE_TREE.mkdir(parents=True, exist_ok=True)
    for name in PACKAGES:
        link = SOURCE_TREE / name
        if not link.is_symlink():
            link.symlink_to(ROOT / name, target_is_directory=True)


def on_files(files, config):
    for path in [ROOT / "CHANGELOG.md", ROOT / "bench" / "RESULTS.md",
                 *sorted((ROOT / "bench" / "log").glob("*.md"))]:
        files.append(File.generated(config, path.relative_to(ROOT).as_posix(), abs_src_path=str(path)))
    return files
