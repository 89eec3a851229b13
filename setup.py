"""Build hook: the wheel carries the top-level settings.ini as the package's defaults (deepseq_nb/settings.ini).

The experiment configuration users edit is the one file at the root of the checkout; it is copied into the built
package here, at build time, so the defaults an installed copy runs with cannot drift from it (there is no second,
hand-maintained copy in the repository). Everything else about the build is in pyproject.toml."""
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py


class BuildPyWithSettings(build_py):
    "build_py that also copies settings.ini into the built package (editable installs read the checkout's)."

    def run(self):
        super().run()
        if getattr(self, 'editable_mode', False): return
        src = Path(__file__).resolve().parent/'settings.ini'
        if not src.is_file(): raise FileNotFoundError(f"{src} is missing: the wheel ships it as the defaults.")
        self.copy_file(str(src), str(Path(self.build_lib)/'deepseq_nb'/'settings.ini'))


setup(cmdclass={'build_py': BuildPyWithSettings})
