/*
 * The job page. Loads the job and its whole trial history once (one columnar snapshot), then every
 * second asks only for what changed (GET /api/v1/jobs/{id}/trials?since=<X-Job-Seq>) and merges it
 * into local state; the job itself (state, counts) is re-read, without trials, only when its seq moved. Plots and the trial table
 * (sorted and filtered over every trial, shown 200 rows a page) are computed in the browser.
 */
(function () {
  "use strict";
  const { api, fmt, fmtSecs, age, el, badge, objectiveOf, show, authOn } = window.BC;
  const { XY, Bars, paretoFront } = window.BCPlot;

  const POLL_MS = 1000, IDLE_POLL_MS = 5000, JOB_REFRESH_MS = 10000, PAGE = 200;
  const STATES = ["queued", "running", "completed", "failed", "cancelled", "abandoned"];
  const TERMINAL = ["completed", "failed", "cancelled"];
  const TOKEN_KEY = "bocompress_bearer";
  const jobId = Number(document.body.dataset.jobId);
  const $ = (id) => document.getElementById(id);

  const S = {
    job: null, trials: new Map(), seq: 0, selected: null, userPicked: false,
    sort: { key: "number", dir: 1 }, filter: "", page: 0,
    view: null, best: null, counts: {}, lastJobAt: 0, ticks: 0, notFound: false,
  };
  window.__bocompress = S;   // for debugging and tests

  // ------------------------------------------------------------------ derived values

  function isCompression() { return S.job && S.job.kind === "compression"; }
  function constrained() { return isCompression() && (S.job.spec.objective || {}).kind === "constrained"; }
  function obj() { return objectiveOf(S.job); }
  function val(t, k) { const v = (t.values || {})[k]; return v === undefined || v === null ? null : Number(v); }
  function objective(t) { return t.state === "completed" ? val(t, obj().metric) : null; }
  /** Smaller is better, whatever the job's direction. */
  function score(t) {
    const v = objective(t);
    if (v === null || !Number.isFinite(v)) return null;
    return obj().direction === "maximize" ? -v : v;
  }
  function duration(t) {
    if (t.started_at === null) return null;
    const end = t.finished_at !== null ? t.finished_at : (t.state === "running" ? Date.now() : null);
    return end === null ? null : (end - t.started_at) / 1000;
  }
  /** Seconds since an epoch-ms time, as "12 s" etc. */
  function ago(ms) { return ms === null ? "–" : fmtSecs((Date.now() - ms) / 1000) + " ago"; }
  /** Times are kept as epoch milliseconds (the snapshot sends them so; API items are converted). */
  function ms(iso) { return iso ? Date.parse(iso) : null; }
  function fromApi(t) {
    t.created_at = ms(t.created_at); t.started_at = ms(t.started_at); t.finished_at = ms(t.finished_at);
    return t;
  }

  function derive() {
    const all = Array.from(S.trials.values());
    const counts = {};
    let best = null, bestS = Infinity;
    for (const t of all) {
      counts[t.state] = (counts[t.state] || 0) + 1;
      const s = score(t);
      if (s !== null && (s < bestS || (s === bestS && t.number < best.number))) { best = t; bestS = s; }
    }
    S.all = all;
    S.counts = counts;
    S.best = best;
    S.view = null;   // the table's sorted view, rebuilt on demand
    if (!S.userPicked || !S.trials.has(S.selected)) S.selected = best ? best.id : null;
  }

  // ------------------------------------------------------------------ header and stats

  function renderHeader() {
    const j = S.job;
    $("job-name").textContent = j.name;
    const st = $("job-state");
    st.className = "badge s-" + j.state;
    st.textContent = j.state;
    const bits = [];
    if (j.kind === "compression") {
      const c = j.spec.compression || {}, o = j.spec.objective || {};
      bits.push(c.method + " on " + c.model, "data " + c.data);
      if (o.kind === "constrained") bits.push("constrained: R ≤ " + o.budget);
      else bits.push((o.kind || "scalarized") + " κ = " + (o.kappa === undefined ? 1 : o.kappa));
      bits.push("cost " + (o.cost || "params"));
    } else {
      const o = obj();
      bits.push("ask/tell", (j.search_space || []).length + " parameters", o.direction + " " + o.metric);
    }
    bits.push("owner " + j.owner, "created " + age(j.created_at) + " ago");
    $("job-sub").textContent = bits.join(" · ");
    const reason = $("job-reason");
    reason.textContent = j.reason || "";
    show(reason, j.state === "failed" && !!j.reason);
    // The service's warnings about the best trial (a collapsed model must never look like a result).
    const warn = $("job-warnings");
    const ws = j.warnings || [];
    warn.textContent = "";
    for (const w of ws) warn.appendChild(el("div", null, "⚠ " + w));
    show(warn, ws.length > 0);
    // A ChipNet job's one long task: its fraction done and what it is doing (sent with its heartbeats).
    const pr = j.progress;
    show($("job-progress"), !!pr);
    if (pr) {
      const frac = Math.min(1, Math.max(0, Number(pr.fraction) || 0));
      $("job-progress-text").textContent = "ChipNet " + pr.state + " · " + Math.round(100 * frac) + "% · " + (pr.message || "");
      $("job-progress-bar").style.width = (100 * frac).toFixed(1) + "%";
    }
    show($("cancel"), !TERMINAL.includes(j.state));
    document.title = j.name + " · job " + j.id + " · bocompress";
  }

  function renderStats() {
    const j = S.job;
    const max = Number(j.spec.budget.max_trials) || 0;
    const c = S.counts;
    const done = (c.completed || 0) + (c.failed || 0) + (c.abandoned || 0);
    $("st-progress").textContent = done + " / " + max;
    $("st-bar").style.width = (max ? Math.min(100, (100 * done) / max) : 0).toFixed(1) + "%";
    const b = S.best;
    $("st-best").textContent = b ? fmt(objective(b), 4) : "–";
    $("st-best-sub").textContent = b ? "trial #" + b.number + " · " + obj().metric : "no completed trial yet";
    if (isCompression()) {
      $("st-lr-label").textContent = "Best L · R";
      $("st-lr").textContent = b ? fmt(val(b, "distill_l2")) + " · " + fmt(val(b, "ratio")) : "–";
      $("st-lr-sub").textContent = b ? "distillation error · cost ratio (" + ((j.spec.objective || {}).cost || "params") + ")" : "";
    } else {
      $("st-lr-label").textContent = "In flight";
      $("st-lr").textContent = (c.running || 0) + " running";
      $("st-lr-sub").textContent = (c.queued || 0) + " queued";
    }
    $("st-counts").replaceChildren(...STATES.filter((s) => c[s]).map((s) =>
      el("span", { className: "badge s-" + s, title: s }, s + " " + c[s])));
    if (!S.all.length) $("st-counts").replaceChildren(el("span", { className: "muted small" }, "none yet"));
  }

  // ------------------------------------------------------------------ charts

  const charts = {
    objective: new XY($("chart-objective"), { xLabel: "trial", yLog: "auto", onPick: pick, empty: "No completed trial yet" }),
    pareto: new XY($("chart-pareto"), { xLabel: "R  (cost ratio)", yLabel: "L  (distillation error)", yLog: "auto",
                                         onPick: pick, empty: "No completed trial yet" }),
    theta: new Bars($("chart-theta"), { yMax: 1, empty: "No trial selected" }),
  };
  S.charts = charts;

  function trialTip(t) {
    const lines = ["trial #" + t.number + "  (" + t.state + ")"];
    if (isCompression()) {
      lines.push("objective " + fmt(val(t, "objective"), 4), "L " + fmt(val(t, "distill_l2"), 4) + "   R " + fmt(val(t, "ratio"), 4));
    } else {
      lines.push(obj().metric + " " + fmt(objective(t), 4));
    }
    return lines.join("\n");
  }

  function renderCharts() {
    const done = S.all.filter((t) => t.state === "completed").sort((a, b) => a.number - b.number);
    const dir = obj().direction;
    // Objective per trial, with the best so far. A constrained job plots L: over-budget trials hollow.
    const useL = constrained();
    const yOf = (t) => (useL ? val(t, "distill_l2") : objective(t));
    const ok = useL ? done.filter((t) => val(t, "feasible") !== 0) : done;
    const bad = useL ? done.filter((t) => val(t, "feasible") === 0) : [];
    const bx = [], by = [];
    let cur = null;
    for (const t of ok) {
      const v = yOf(t);
      if (v === null || !Number.isFinite(v)) continue;
      if (cur === null || (dir === "maximize" ? v > cur : v < cur)) cur = v;
      bx.push(t.number); by.push(cur);
    }
    const lastN = S.all.reduce((m, t) => Math.max(m, t.number), 0);
    charts.objective.opts.yLabel = useL ? "L (feasible)" : isCompression() ? "κ·L + R" : obj().metric;
    charts.objective.set([
      { kind: "points", x: bad.map((t) => t.number), y: bad.map(yOf), ids: bad.map((t) => t.id), color: "#9ca3af",
        hollow: true, radius: 3, pick: true, tip: (i) => trialTip(bad[i]) + "\nover budget" },
      { kind: "points", x: ok.map((t) => t.number), y: ok.map(yOf), ids: ok.map((t) => t.id), color: "rgba(37,99,235,.55)",
        radius: done.length > 2000 ? 1.8 : 3, pick: true, tip: (i) => trialTip(ok[i]) },
      { kind: "step", x: bx, y: by, color: "#f59e0b", width: 2.2, extendTo: Math.max(lastN, bx[bx.length - 1] || 0) },
    ], S.selected);
    $("obj-legend").replaceChildren(
      el("span", null, [el("i", { style: { background: "rgba(37,99,235,.7)" } }), useL ? "L" : "objective"]),
      el("span", null, [el("i", { className: "line", style: { background: "#f59e0b" } }), "best so far"]));

    show($("pareto-card"), isCompression());
    if (isCompression()) {
      const R = done.map((t) => val(t, "ratio")), Lv = done.map((t) => val(t, "distill_l2"));
      const front = paretoFront(R, Lv);
      const f = front.map((i) => done[i]);
      charts.pareto.set([
        { kind: "points", x: R, y: Lv, ids: done.map((t) => t.id), color: "rgba(100,116,139,.45)",
          radius: done.length > 2000 ? 1.8 : 2.8, pick: true, tip: (i) => trialTip(done[i]) },
        { kind: "step", markers: true, x: front.map((i) => R[i]), y: front.map((i) => Lv[i]), ids: f.map((t) => t.id),
          color: "#ea580c", width: 2, radius: 4, stroke: "#fff", pick: true, tip: (i) => trialTip(f[i]) + "\non the front" },
      ], S.selected);
      $("pareto-legend").replaceChildren(
        el("span", null, [el("i", { style: { background: "rgba(100,116,139,.6)" } }), "trials"]),
        el("span", null, [el("i", { style: { background: "#ea580c" } }), "front (" + front.length + ")"]));
    }
    renderTheta();
  }

  function renderTheta() {
    const t = S.selected === null ? null : S.trials.get(S.selected);
    const space = S.job.search_space || [];
    $("theta-title").textContent = t ? (isCompression() ? "θ per layer" : "Parameters") + " · trial #" + t.number : "θ per layer";
    if (!t || !space.length) { charts.theta.set(null); renderDetail(t); renderLayers(t); return; }
    const comp = isCompression();
    const owners = {};
    for (const l of S.job.layers || []) for (const p of l.params || []) (owners[p] = owners[p] || []).push(l.name);
    const labels = [], values = [], lows = [], highs = [], tips = [];
    for (const sp of space) {
      const v = Number((t.params || {})[sp.name]);
      const lo = Number(sp.low), hi = Number(sp.high);
      labels.push(sp.name);
      if (comp) {
        values.push(v); lows.push(lo); highs.push(hi);
        const size = Number(sp.size) || 0;
        const kept = size ? " · kept " + keep(v, size) + " / " + size : "";
        const ls = owners[sp.name] && (owners[sp.name].length > 1 || owners[sp.name][0] !== sp.name)
          ? "\nlayers: " + owners[sp.name].join(", ") : "";
        tips.push(sp.name + "\nθ = " + fmt(v, 4) + kept + "\nrange [" + fmt(lo) + ", " + fmt(hi) + "]" + ls);
      } else {
        const span = hi - lo;
        const pos = sp.log && lo > 0 ? Math.log(v / lo) / Math.log(hi / lo) : span > 0 ? (v - lo) / span : 0;
        values.push(pos); lows.push(0); highs.push(1);
        tips.push(sp.name + " = " + fmt(v, 4) + "\nrange [" + fmt(lo) + ", " + fmt(hi) + "]" + (sp.log ? " (log)" : ""));
      }
    }
    charts.theta.opts.yLabel = comp ? "θ (kept fraction)" : "position in range";
    charts.theta.set({ labels, values, lows, highs, tips });
    renderDetail(t);
    renderLayers(t);
  }

  /** kept(θ, size) = clamp(floor(θ·size + 0.5), 1, size), as bocompress.costs. */
  function keep(theta, size) { return Math.min(size, Math.max(1, Math.floor(theta * size + 0.5))); }

  function renderDetail(t) {
    const box = $("trial-detail");
    if (!t) { box.replaceChildren(el("p", { className: "muted small" }, "No trial selected.")); return; }
    const rows = [["Trial", "#" + t.number + (S.best && S.best.id === t.id ? "  (best)" : "")], ["State", badge(t.state)]];
    if (isCompression()) {
      const sem = (t.sem || {}).distill_l2;
      rows.push(["Objective", fmt(val(t, "objective"), 4)],
                ["L", fmt(val(t, "distill_l2"), 4) + (sem !== undefined ? " ± " + fmt(sem, 2) : "")],
                ["R", fmt(val(t, "ratio"), 4)]);
      if (val(t, "ratio_measured") !== null) rows.push(["R measured", fmt(val(t, "ratio_measured"), 4)]);
    }
    for (const k of Object.keys(t.values || {}).sort()) {
      if (["objective", "distill_l2", "ratio", "ratio_measured", "feasible"].includes(k) && isCompression()) continue;
      rows.push([k, fmt(t.values[k], 4)]);
    }
    rows.push(["Attempt", String(t.attempt)], ["Worker", t.worker || "–"],
              ["Duration", fmtSecs(duration(t))], ["Finished", ago(t.finished_at)]);
    const dl = el("dl", null, rows.flatMap(([k, v]) => [el("dt", null, k), el("dd", null, v)]));
    box.replaceChildren(dl);
    if (t.error) box.appendChild(el("pre", { className: "trial-error" }, t.error));
  }

  function renderLayers(t) {
    const layers = S.job.layers || [];
    show($("layers-card"), layers.length > 0);
    if (!layers.length) return;
    const sizes = {};
    for (const sp of S.job.search_space || []) sizes[sp.name] = Number(sp.size) || 0;
    $("layers-sub").textContent = layers.length + " compressible layers · " + (S.job.search_space || []).length + " parameters";
    $("layers-body").replaceChildren(...layers.map((l) => {
      const ps = l.params || [];
      const th = t ? ps.map((p) => fmt((t.params || {})[p], 3)).join(", ") : "–";
      const kept = t ? ps.map((p) => (sizes[p] ? keep(Number((t.params || {})[p]), sizes[p]) + "/" + sizes[p] : "–")).join(", ") : "–";
      return el("tr", null, [el("td", { className: "mono" }, l.name), el("td", null, l.type), el("td", null, l.method),
        el("td", { className: "mono" }, (l.shape || []).join(" × ")), el("td", { className: "mono" }, ps.join(", ")),
        el("td", { className: "num" }, th), el("td", { className: "num" }, kept)]);
    }));
  }

  // ------------------------------------------------------------------ trial table

  function columns() {
    const cols = [
      { key: "number", label: "#", num: true, get: (t) => t.number, show: (t) => String(t.number) },
      { key: "state", label: "State", get: (t) => t.state, show: (t) => badge(t.state) },
    ];
    if (isCompression()) {
      cols.push(
        { key: "objective", label: "Objective", num: true, get: (t) => objective(t), show: (t) => fmt(objective(t), 4) },
        { key: "distill_l2", label: "L", num: true, get: (t) => val(t, "distill_l2"), show: (t) => fmt(val(t, "distill_l2"), 4) },
        { key: "sem", label: "± sem", num: true, get: (t) => ((t.sem || {}).distill_l2 ?? null), show: (t) => fmt((t.sem || {}).distill_l2, 2) },
        { key: "ratio", label: "R", num: true, get: (t) => val(t, "ratio"), show: (t) => fmt(val(t, "ratio"), 4) });
    } else {
      const m = obj().metric;
      cols.push({ key: "objective", label: m, num: true, get: (t) => objective(t), show: (t) => fmt(objective(t), 4) });
    }
    cols.push(
      { key: "attempt", label: "Attempt", num: true, get: (t) => t.attempt, show: (t) => String(t.attempt) },
      { key: "worker", label: "Worker", get: (t) => t.worker || null, show: (t) => t.worker || "–" },
      { key: "duration", label: "Duration", num: true, get: duration, show: (t) => fmtSecs(duration(t)) },
      { key: "finished_at", label: "Finished", get: (t) => t.finished_at, show: (t) => ago(t.finished_at) },
      { key: "error", label: "Error", get: (t) => t.error || null, show: (t) => t.error || "", cls: "err" });
    return cols;
  }

  let cols = [];

  function renderHead() {
    cols = columns();
    $("trials-head").replaceChildren(...cols.map((c) => {
      const th = el("th", { className: (c.num ? "num " : "") + (S.sort.key === c.key ? (S.sort.dir > 0 ? "sorted-asc" : "sorted-desc") : ""),
                             dataset: { key: c.key }, title: "sort by " + c.label }, c.label);
      th.addEventListener("click", () => {
        S.sort = S.sort.key === c.key ? { key: c.key, dir: -S.sort.dir } : { key: c.key, dir: 1 };
        S.page = 0; S.view = null; renderHead(); renderTable();
      });
      return th;
    }));
  }

  function sortedView() {
    if (S.view) return S.view;
    const c = cols.find((x) => x.key === S.sort.key) || cols[0];
    const dir = S.sort.dir;
    const rows = S.filter ? S.all.filter((t) => t.state === S.filter) : S.all.slice();
    const keyed = rows.map((t) => [c.get(t), t]);
    keyed.sort((a, b) => {
      const x = a[0], y = b[0];
      if (x === null && y === null) return a[1].number - b[1].number;
      if (x === null) return 1;          // blanks last, both directions
      if (y === null) return -1;
      if (x < y) return -dir;
      if (x > y) return dir;
      return a[1].number - b[1].number;
    });
    S.view = keyed.map((k) => k[1]);
    return S.view;
  }

  function renderTable() {
    const view = sortedView();
    const pages = Math.max(1, Math.ceil(view.length / PAGE));
    S.page = Math.min(S.page, pages - 1);
    const start = S.page * PAGE, rows = view.slice(start, start + PAGE);
    $("trials-body").replaceChildren(...rows.map((t) => {
      const tr = el("tr", { className: "clickable" + (t.id === S.selected ? " selected" : ""),
                            dataset: { trialId: String(t.id), number: String(t.number), state: t.state } },
        cols.map((c) => {
          const v = c.show(t);
          return el("td", { className: (c.num ? "num " : "") + (c.cls || ""), title: c.key === "error" ? (t.error || "") : "" }, v);
        }));
      tr.addEventListener("click", () => pick(t.id));
      return tr;
    }));
    show($("trials-empty"), view.length === 0);
    $("page-info").textContent = view.length ? (start + 1) + "–" + (start + rows.length) + " of " + view.length.toLocaleString() : "0 trials";
    $("prev").disabled = S.page === 0;
    $("next").disabled = S.page >= pages - 1;
    const sel = $("trial-filter"), cur = S.filter;
    const opts = [el("option", { value: "" }, "all (" + S.all.length + ")")].concat(
      STATES.filter((s) => S.counts[s] || s === cur).map((s) => el("option", { value: s }, s + " (" + (S.counts[s] || 0) + ")")));
    sel.replaceChildren(...opts);
    sel.value = cur;
  }

  function pick(id) {
    if (!S.trials.has(id)) return;
    S.selected = id;
    S.userPicked = true;
    renderCharts();
    for (const tr of $("trials-body").children) tr.classList.toggle("selected", Number(tr.dataset.trialId) === id);
  }

  function renderAll() {
    derive();
    renderHeader();
    renderStats();
    renderCharts();
    renderTable();
  }

  // ------------------------------------------------------------------ data

  /** Fetch trials changed after S.seq (all pages), merge them; returns how many changed. */
  async function fetchTrials() {
    let cursor = null, n = 0, seq = S.seq;
    do {
      let q = "/api/v1/jobs/" + jobId + "/trials?since=" + S.seq;
      if (cursor) q += "&cursor=" + encodeURIComponent(cursor);
      const { data, headers } = await api(q);
      for (const t of data.items) S.trials.set(t.id, fromApi(t));
      n += data.items.length;
      cursor = data.next_cursor;
      const h = Number(headers.get("X-Job-Seq"));
      if (Number.isFinite(h)) seq = h;
    } while (cursor);
    const moved = seq !== S.seq;
    S.seq = seq;
    return { n, moved };
  }

  /** Re-read the job (state, counts, layers) without its trials: the light half of the snapshot. */
  async function fetchJob() {
    const { data } = await api("/jobs/" + jobId + "/snapshot.json?trials=false");
    S.job = data.job;
    S.lastJobAt = Date.now();
  }

  /**
   * The first read: the job and every trial in one columnar response (GET /jobs/{id}/snapshot.json),
   * turned into the same trial objects the API's ?since= polling returns.
   */
  async function fetchSnapshot() {
    const { data } = await api("/jobs/" + jobId + "/snapshot.json");
    S.job = data.job;
    S.lastJobAt = Date.now();
    const c = data.trials;
    for (let i = 0; i < c.n; i++) {
      S.trials.set(c.id[i], {
        id: c.id[i], job_id: jobId, seq: c.seq[i], number: c.number[i], state: c.state[i], params: c.params[i] || {},
        values: c.values[i] || {}, sem: c.sem[i] || {}, attempt: c.attempt[i], worker: c.worker[i],
        created_at: c.created_at[i], started_at: c.started_at[i], finished_at: c.finished_at[i], error: c.error[i],
      });
    }
    S.seq = data.seq;
  }

  function notFound() {
    S.notFound = true;
    show($("job-view"), false);
    show($("notfound"), true);
    document.title = "Job not found · bocompress";
  }

  function setLive(ok, msg) {
    $("live-dot").className = "live-dot " + (ok ? (TERMINAL.includes(S.job.state) ? "" : "on") : "err");
    $("updated").textContent = msg;
  }

  async function init() {
    try {
      await fetchSnapshot();
      performance.mark("bocompress:data");
    } catch (e) {
      if (e.status === 404) notFound();
      else if (e.status !== 401) { $("error").textContent = "Could not load the job: " + e.message; show($("error"), true); show($("job-view"), true); }
      window.__bocompressReady = performance.now();
      document.body.dataset.ready = "1";
      return;
    }
    show($("job-view"), true);
    derive();
    renderHead();
    renderHeader();
    renderStats();
    performance.mark("bocompress:derived");
    renderCharts();
    performance.mark("bocompress:charts");
    renderTable();
    performance.mark("bocompress:table");
    setLive(true, liveText());
    window.__bocompressReady = performance.now();
    document.body.dataset.ready = "1";
    setTimeout(poll, POLL_MS);
  }

  function liveText() {
    return (TERMINAL.includes(S.job.state) ? "final" : "live") + " · updated " + new Date().toLocaleTimeString();
  }

  async function poll() {
    if (S.notFound) return;
    let wait = TERMINAL.includes(S.job.state) ? IDLE_POLL_MS : POLL_MS;
    if (document.hidden) { setTimeout(poll, wait); return; }
    try {
      const { n, moved } = await fetchTrials();
      S.ticks++;
      // a running long task (ChipNet) reports progress without moving the trials: re-read the job often
      const busy = S.job.progress && S.job.progress.state === "running";
      const stale = Date.now() - S.lastJobAt > (busy ? 2 * POLL_MS : JOB_REFRESH_MS);
      if (moved || stale) {
        const before = S.job.state;
        await fetchJob();
        if (before !== S.job.state) renderHeader();
      }
      if (n || moved || stale) renderAll();
      setLive(true, liveText());
      show($("error"), false);
      wait = TERMINAL.includes(S.job.state) ? IDLE_POLL_MS : POLL_MS;
    } catch (e) {
      if (e.status === 404) { notFound(); return; }
      setLive(false, "connection lost: " + e.message + " (retrying)");
    }
    setTimeout(poll, wait);
  }

  // ------------------------------------------------------------------ controls

  $("trial-filter").addEventListener("change", (e) => { S.filter = e.target.value; S.page = 0; S.view = null; renderTable(); });
  $("prev").addEventListener("click", () => { S.page = Math.max(0, S.page - 1); renderTable(); });
  $("next").addEventListener("click", () => { S.page += 1; renderTable(); });

  // Cancel is a POST: the sign-in cookie is read-only, so with auth on it needs a bearer token,
  // typed here (and kept in sessionStorage for this tab only when the user asks). Auth off: none.
  const dialog = $("cancel-dialog");
  $("cancel").addEventListener("click", () => {
    show($("cancel-token-wrap"), authOn);
    show($("cancel-error"), false);
    const saved = authOn ? sessionStorage.getItem(TOKEN_KEY) : null;
    $("cancel-token").value = saved || "";
    $("cancel-remember").checked = !!saved;
    dialog.showModal();
    if (authOn && !saved) $("cancel-token").focus();
  });
  $("cancel-form").addEventListener("submit", async (e) => {
    e.preventDefault();
    const submitter = e.submitter;
    if (!submitter || submitter.value !== "cancel") { dialog.close(); return; }
    const token = authOn ? $("cancel-token").value.trim() : null;
    if (authOn && !token) { $("cancel-error").textContent = "Enter a client or admin token."; show($("cancel-error"), true); return; }
    submitter.disabled = true;
    try {
      const { data } = await api("/api/v1/jobs/" + jobId + "/cancel", { method: "POST", token: token || undefined });
      if (authOn) {
        if ($("cancel-remember").checked) sessionStorage.setItem(TOKEN_KEY, token);
        else sessionStorage.removeItem(TOKEN_KEY);
      }
      S.job = data;
      S.lastJobAt = Date.now();
      dialog.close();
      await fetchTrials();
      renderAll();
    } catch (err) {
      if (authOn && (err.status === 401 || err.status === 403)) sessionStorage.removeItem(TOKEN_KEY);
      $("cancel-error").textContent = "Not cancelled: " + err.message;
      show($("cancel-error"), true);
    } finally {
      submitter.disabled = false;
    }
  });

  if (Number.isFinite(jobId)) init();
})();
