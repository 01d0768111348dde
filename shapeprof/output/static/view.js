// shapeprof's interactive view: lays out a view (shapeprof/output/views.py builds it) with plotly for the charts.
// Used by the one-file HTML report and by the SHAPEPROF TensorBoard tab, so both show the same thing.
// Everything from a report is put into the page as text (textContent, attributes set one by one): never as
// markup, so a model or module name cannot run script here.
(function () {
  "use strict";

  const ROW_LIMIT = 300;   // rows drawn at first: a 5,000-node table stays quick; "show all" draws the rest

  function el(tag, props, ...children) {
    const node = document.createElement(tag);
    for (const [key, value] of Object.entries(props || {})) {
      if (value === undefined || value === null || value === false) continue;
      if (key === "className") node.className = value;
      else if (key === "text") node.textContent = value;
      else if (key.startsWith("on")) node.addEventListener(key.slice(2), value);
      else node.setAttribute(key, value === true ? "" : String(value));
    }
    for (const child of children.flat()) {
      if (child === null || child === undefined || child === false) continue;
      node.appendChild(typeof child === "string" ? document.createTextNode(child) : child);
    }
    return node;
  }

  function section(title, ...children) {
    return el("section", {className: "sp-section"}, el("h2", {text: title}), ...children);
  }

  function keyValues(rows, className) {
    return el("table", {className: "sp-kv " + (className || "")},
      el("tbody", null, rows.map(([k, v]) => el("tr", null, el("th", {text: k}), el("td", {text: v})))));
  }

  function plot(target, figure, config) {
    return Plotly.newPlot(target, figure.data, figure.layout,
      Object.assign({displaylogo: false, responsive: true}, config || {}));
  }

  // ------------------------------------------------------------------------------------------ a report

  function renderReport(root, view) {
    const r = view.report;
    const state = {folded: true, sortKey: "predicted", descending: true, filter: "", showAll: false,
                   selected: null};
    const fold = el("input", {type: "checkbox", id: "sp-fold", checked: true});
    const filter = el("input", {type: "search", id: "sp-filter", placeholder: "filter by module or op",
                                "aria-label": "filter by module or op"});
    const roofline = el("div", {id: "sp-roofline", className: "sp-chart"});
    const rooflineNote = el("p", {className: "sp-note"});
    const tree = el("div", {id: "sp-tree", className: "sp-chart"});
    const table = el("table", {className: "sp-nodes", id: "sp-nodes"});
    const tableNote = el("p", {className: "sp-note", id: "sp-table-note"});
    const more = el("button", {type: "button", id: "sp-show-all", text: "show all rows"});

    root.appendChild(el("div", {className: "sp-report"},
      keyValues(r.summary, "sp-summary"),
      el("label", {className: "sp-fold"}, fold, " fold twin groups (the same op at the same place of every "
        + "repeated layer: one point, one row)"),
      section("Roofline", el("p", {className: "sp-note", text: "log-log: FLOP/s reached against FLOP per byte "
        + "moved; point area = time; red memory-bound, green compute-bound" + (r.measured ? "; open circles "
        + "at the measured speed" : "") + ". Click a point to find it in the table."}), roofline, rooflineNote),
      section("Nodes", el("div", {className: "sp-controls"}, filter), table, tableNote, more),
      section("Modules", el("p", {className: "sp-note", text: "each module's share of the predicted time; "
        + "click to zoom in"}), tree),
      section("Findings", r.findings.length ? el("ol", {className: "sp-findings"}, r.findings.map(f =>
        el("li", null, el("strong", {text: f.text}), el("div", {text: f.why}),
           el("div", {className: "sp-suggestion", text: f.suggestion}))))
        : el("p", {text: "no memory-bound group takes a notable share of the time"})),
      r.coverage.length ? section("Ops without a cost formula", el("ul", null,
        r.coverage.map(c => el("li", {text: c})))) : null,
      r.notes.length ? section("Notes", el("ul", null, r.notes.map(n => el("li", {text: n})))) : null));

    function rows() {
      const all = state.folded ? r.groups : r.nodes;
      const needle = state.filter.toLowerCase();
      const kept = needle ? all.filter(x => (x.module || "").toLowerCase().includes(needle)
        || x.op.toLowerCase().includes(needle) || x.name.toLowerCase().includes(needle)) : all;
      const key = state.sortKey, sign = state.descending ? -1 : 1;
      const numeric = r.columns.find(c => c.key === key).numeric;
      return kept.slice().sort((a, b) => {
        const x = a[key], y = b[key];
        if (x === y) return a.id - b.id;
        if (x === null || x === undefined) return 1;     // empty cells last either way
        if (y === null || y === undefined) return -1;
        return sign * (numeric ? (x < y ? -1 : 1) : String(x).localeCompare(String(y)));
      });
    }

    function drawTable() {
      const sorted = rows();
      const shown = state.showAll ? sorted : sorted.slice(0, ROW_LIMIT);
      if (state.selected !== null && !shown.some(x => x.id === state.selected)) {
        const chosen = sorted.find(x => x.id === state.selected);
        if (chosen) shown.push(chosen);
      }
      const head = el("tr", null, r.columns.map(c => el("th", {
        "data-key": c.key, className: c.numeric ? "sp-num" : "",
        "aria-sort": c.key === state.sortKey ? (state.descending ? "descending" : "ascending") : "none",
        onclick: () => {
          state.descending = c.key === state.sortKey ? !state.descending : c.numeric;
          state.sortKey = c.key;
          drawTable();
        }}, c.label + (c.key === state.sortKey ? (state.descending ? " ▼" : " ▲") : ""))));
      const body = el("tbody", null, shown.map(x => el("tr", {
        "data-id": x.id, className: "sp-" + x.bound + (x.id === state.selected ? " sp-selected" : ""),
        onclick: () => select(x.id, false)}, r.columns.map(c => el("td", {
          "data-key": c.key, className: c.numeric ? "sp-num" : "", title: c.key === "module" ? x.module : null,
          text: x.text[c.key]})))));
      table.replaceChildren(el("thead", null, head), body);
      tableNote.textContent = `${shown.length} of ${sorted.length} ${state.folded ? "groups" : "nodes"}`
        + (state.filter ? ` matching "${state.filter}"` : "") + (state.folded ? ` (${r.nodes.length} nodes)` : "");
      more.hidden = shown.length >= sorted.length;
    }

    function select(id, scroll) {
      state.selected = id;
      drawTable();
      const row = table.querySelector(`tr[data-id="${id}"]`);
      if (row && scroll) row.scrollIntoView({block: "center"});
    }

    function drawCharts() {
      const figures = r.figures;
      const roof = state.folded ? figures.roofline_groups : figures.roofline_nodes;
      plot(roofline, roof.figure).then(() => {
        roofline.removeAllListeners && roofline.removeAllListeners("plotly_click");
        roofline.on("plotly_click", event => {
          const point = event.points && event.points[0];
          if (point && point.customdata) select(point.customdata[0], true);
        });
      });
      rooflineNote.textContent = roof.left_out ? `${roof.left_out} ${state.folded ? "groups" : "nodes"} with `
        + "no FLOPs or no bytes (data movement) have no place on log axes" : "";
      plot(tree, (state.folded ? figures.tree_groups : figures.tree_nodes).figure);
    }

    fold.addEventListener("change", () => {
      state.folded = fold.checked;
      state.selected = null;
      state.showAll = false;
      drawCharts();
      drawTable();
    });
    filter.addEventListener("input", () => { state.filter = filter.value; drawTable(); });
    more.addEventListener("click", () => { state.showAll = true; drawTable(); });
    drawCharts();
    drawTable();
  }

  // ------------------------------------------------------------------------------------------ optimize

  function renderOptimize(root, view) {
    const o = view.optimize;
    const chart = el("div", {id: "sp-before-after-chart", className: "sp-chart sp-small"});
    root.appendChild(el("div", {className: "sp-optimize"},
      keyValues(o.summary, "sp-summary"),
      o.refused ? el("p", {className: "sp-refused", text: "nothing rewritten: " + o.refused}) : null,
      section("Before and after",
        el("table", {className: "sp-before-after", id: "sp-before-after"},
          el("thead", null, el("tr", null, el("th"), el("th", {text: "before"}), el("th", {text: "after"}),
            el("th", {text: "change"}))),
          el("tbody", null, o.sides.map(([what, before, after, change]) => el("tr", null,
            el("th", {text: what}), el("td", {text: before}), el("td", {text: after}),
            el("td", {text: change}))))),
        chart),
      section("What each rewrite changed", o.rewrites.map(w => el("div", {className: "sp-rewrite",
        "data-rewrite": w.name},
        el("h3", null, el("span", {text: w.name}), " ", el("span", {className: "sp-status sp-" +
          w.status.replace(/\s+/g, "-"), text: w.status})),
        w.error ? el("p", {className: "sp-refused", text: w.error}) : null,
        w.verification ? el("p", {className: "sp-note", text: "verification: " + w.verification}) : null,
        w.applied.length ? el("table", {className: "sp-applied"},
          el("thead", null, el("tr", null, ["where", "became", "bytes saved", "time saved"].map(h =>
            el("th", {text: h})))),
          el("tbody", null, w.applied.map(a => el("tr", null, el("td", {text: a.where}), el("td", {text: a.what}),
            el("td", {className: "sp-num", text: a.bytes_saved}),
            el("td", {className: "sp-num", text: a.seconds_saved}))))) : null,
        w.skipped.length ? el("details", null, el("summary", {text: `${w.skipped.length} left alone`}),
          el("ul", null, w.skipped.map(s => el("li", {text: `${s.where}: ${s.reason}`})))) : null,
        w.notes.length ? el("ul", null, w.notes.map(n => el("li", {text: n}))) : null))),
      o.not_captured.length ? section("Not captured", el("ul", null, o.not_captured.map(n =>
        el("li", {text: n})))) : null));
    plot(chart, o.figure.figure);
  }

  function render(root, view) {
    root.replaceChildren(el("h1", {className: "sp-title", text: view.title}));
    if (view.error) root.appendChild(el("p", {className: "sp-refused", text: view.error}));
    else if (view.kind === "report") renderReport(root, view);
    else if (view.kind === "optimize") renderOptimize(root, view);
    else root.appendChild(el("p", {className: "sp-refused", text: "unknown view kind " + view.kind}));
  }

  // runs: [{id, name}]; load(id) -> Promise of a view. A selector when there are several.
  function mount(root, runs, load) {
    const body = el("div", {id: "sp-view"});
    if (!runs.length) {
      root.replaceChildren(el("p", {className: "sp-empty", text: "No shapeprof reports here. `shapeprof trace "
        + "script.py` writes them (report.json, measured.json, optimize.json) into its run directory."}));
      return;
    }
    const picker = el("select", {id: "sp-runs", "aria-label": "report"},
      runs.map(run => el("option", {value: run.id, text: run.name})));
    function show(id) {
      body.replaceChildren(el("p", {className: "sp-note", text: "loading…"}));
      Promise.resolve(load(id)).then(view => render(body, view), error => {
        body.replaceChildren(el("p", {className: "sp-refused", text: "cannot show this report: " + error}));
      });
    }
    picker.addEventListener("change", () => show(picker.value));
    root.replaceChildren(el("div", {className: "sp-bar"}, el("label", null, `${runs.length} report`
      + (runs.length > 1 ? "s" : "") + " ", picker)), body);
    show(runs[0].id);
  }

  window.shapeprofView = {render: render, mount: mount};
})();
