"""The SHAPEPROF TensorBoard tab: a dynamic TensorBoard plugin, registered through the `tensorboard_plugins` entry
point, so TensorBoard shows it as soon as shapeprof is installed.

It reads the reports shapeprof wrote under TensorBoard's logdir (report.json, measured.json, optimize.json: those
of `shapeprof trace`'s run directories and those `export_tensorboard` puts in its runs) and shows each one's view
(`shapeprof.output.views`), the same as the HTML report. Every file the tab loads is served by the routes below:
its script and style from this package, plotly.js from the installed plotly package. Nothing comes from the
network, so it works offline, where the PyTorch Profiler tab only spins.

Routes, under /data/plugin/shapeprof/:
    index.js, view.js, view.css, plotly.min.js   the front end
    runs                                         [{"id", "name"}]: the reports, in the order `saved_files` lists them
    view?run=ID                                  the view of one of them (ID as listed; nothing else is served)
"""
from __future__ import annotations

import os
import threading
import time
from pathlib import Path
from typing import Any

from tensorboard.backend import http_util
from tensorboard.plugins import base_plugin
from werkzeug import wrappers

from ...jsondata import ReportFormatError
from ...text import one_line
from ..html import static_file
from ..jsonfiles import read_saved, saved_files, saved_label
from ..views import view_of

__all__ = ["PLUGIN_NAME", "ShapeprofPlugin"]

PLUGIN_NAME = "shapeprof"
_LISTING_SECONDS = 2.0      # how long a listing of the logdir is reused: TensorBoard asks is_active often


class ShapeprofPlugin(base_plugin.TBPlugin):
    plugin_name = PLUGIN_NAME

    def __init__(self, context: base_plugin.TBContext):
        # with --logdir_spec TensorBoard has no single logdir: the tab then has nothing to read
        self._logdir = Path(context.logdir) if getattr(context, "logdir", None) else None
        self._lock = threading.Lock()
        self._listing: tuple[float, list[Path]] = (-1e9, [])
        self._views: dict[Path, tuple[tuple[int, int], dict[str, Any]]] = {}   # path -> (mtime, size), view

    def frontend_metadata(self) -> base_plugin.FrontendMetadata:
        return base_plugin.FrontendMetadata(es_module_path="/index.js", tab_name="SHAPEPROF", disable_reload=True)

    def is_active(self) -> bool:
        return bool(self._files())

    def get_plugin_apps(self) -> dict[str, Any]:
        return {"/index.js": self._static("tab.js", "text/javascript"),
                "/view.js": self._static("view.js", "text/javascript"),
                "/view.css": self._static("view.css", "text/css"),
                "/plotly.min.js": self._plotly,
                "/runs": self._runs,
                "/view": self._view}

    # ------------------------------------------------------------------------------------------ routes
    def _static(self, name: str, mimetype: str):
        @wrappers.Request.application
        def serve(request):
            return http_util.Respond(request, static_file(name), mimetype)
        return serve

    @wrappers.Request.application
    def _plotly(self, request):
        from ..html import plotly_js
        return http_util.Respond(request, plotly_js(), "text/javascript", expires=3600)

    @wrappers.Request.application
    def _runs(self, request):
        return http_util.Respond(request, [{"id": self._id(p), "name": self._name(p)} for p in self._files()],
                                 "application/json")

    @wrappers.Request.application
    def _view(self, request):
        wanted = request.args.get("run", "")
        path = next((p for p in self._files() if self._id(p) == wanted), None)
        if path is None:   # only listed files are read: an id is never a path to open
            return http_util.Respond(request, f"no shapeprof report {wanted!r} in this logdir", "text/plain",
                                     code=404)
        return http_util.Respond(request, self._view_of(path), "application/json")

    # ------------------------------------------------------------------------------------------ reading
    def _files(self) -> list[Path]:
        """The saved reports under the logdir, listed again at most every couple of seconds."""
        if self._logdir is None:
            return []
        with self._lock:
            listed_at, files = self._listing
            if time.monotonic() - listed_at > _LISTING_SECONDS:
                files = saved_files(self._logdir) if self._logdir.is_dir() else []
                self._listing = (time.monotonic(), files)
            return files

    def _id(self, path: Path) -> str:
        return path.relative_to(self._logdir).as_posix()

    def _name(self, path: Path) -> str:
        return saved_label(path, self._logdir, self._logdir.name)

    def _view_of(self, path: Path) -> dict[str, Any]:
        """The view of one file, kept until the file changes; a file that cannot be read is a view that says
        why (one line), so one bad file never hides the others."""
        try:
            st = path.stat()
            stamp = (st.st_mtime_ns, st.st_size)
        except OSError as e:
            return _error_view(path, f"cannot read {path.name}: {e.strerror or e}")
        with self._lock:
            cached = self._views.get(path)
        if cached is not None and cached[0] == stamp:
            return cached[1]
        try:
            view = view_of(read_saved(path), self._name(path))
        except ReportFormatError as e:   # its message is one line naming the field
            return _error_view(path, f"{self._id(path)}: {e}")
        except OSError as e:
            return _error_view(path, f"{self._id(path)}: {one_line(e)}")
        with self._lock:
            self._views[path] = (stamp, view)
        return view


def _error_view(path: Path, message: str) -> dict[str, Any]:
    return {"kind": "error", "title": os.fspath(path.name), "error": message}
