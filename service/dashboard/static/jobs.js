/* The jobs list: reads GET /api/v1/jobs (cursor pages) and refreshes every few seconds. */
(function () {
  "use strict";
  const { api, fmt, age, el, badge, finished, objectiveOf, show } = window.BC;
  const REFRESH_MS = 4000;
  const body = document.getElementById("jobs-body");
  const filter = document.getElementById("state-filter");
  const more = document.getElementById("more");
  const dot = document.getElementById("live-dot");
  const updated = document.getElementById("updated");
  const errBox = document.getElementById("error");
  let shown = 50;          // how many jobs the user has asked to see
  let nextCursor = null;
  let timer = null;
  let lastOk = 0;

  function row(job) {
    const max = Number(((job.spec || {}).budget || {}).max_trials) || 0;
    const done = finished(job.counts);
    const frac = max > 0 ? Math.min(1, done / max) : 0;
    const fill = el("div", { className: "bar-fill", style: { width: (100 * frac).toFixed(1) + "%" } });
    const o = objectiveOf(job);
    const best = job.best ? (job.best.values || {})[o.metric] : null;
    return el("tr", { dataset: { jobId: String(job.id) } }, [
      el("td", { className: "num" }, String(job.id)),
      el("td", null, [el("a", { href: "/jobs/" + job.id, className: "job-link" }, job.name),
                      el("span", { className: "muted small" }, "  " + (job.kind === "compression"
                        ? ((job.spec.compression || {}).method || "") : "ask/tell"))]),
      el("td", null, [badge(job.state), job.collapsed
        ? el("span", { className: "badge s-failed", title: (job.warnings || []).join("\n") }, "collapsed") : null]),
      el("td", null, el("div", { className: "progress" }, [
        el("div", { className: "bar" }, fill), el("span", { className: "small muted num" }, done + " / " + max)])),
      el("td", { className: "num", title: best === null || best === undefined ? "" : String(best) },
         best === null || best === undefined ? "–" : fmt(best, 4) + (job.best ? "  #" + job.best.number : "")),
      el("td", { title: job.created_at || "" }, age(job.created_at)),
      el("td", null, job.owner),
    ]);
  }

  async function load() {
    const state = filter.value;
    const items = [];
    let cursor = null;
    let remaining = shown;
    // Re-read the pages the user has opened (newest first): states and progress change.
    do {
      const limit = Math.min(remaining, 1000);
      let q = "/api/v1/jobs?limit=" + limit + (state ? "&state=" + encodeURIComponent(state) : "");
      if (cursor) q += "&cursor=" + encodeURIComponent(cursor);
      const { data } = await api(q);
      items.push(...data.items);
      cursor = data.next_cursor;
      remaining -= data.items.length;
    } while (cursor && remaining > 0);
    nextCursor = cursor;
    body.replaceChildren(...items.map(row));
    show(document.getElementById("empty"), items.length === 0);
    show(document.getElementById("more-wrap"), !!nextCursor);
    return items.length;
  }

  async function tick() {
    clearTimeout(timer);
    try {
      const n = await load();
      lastOk = Date.now();
      dot.className = "live-dot on";
      updated.textContent = n + (n === 1 ? " job" : " jobs") + " · live, updated " + new Date().toLocaleTimeString();
      show(errBox, false);
      if (window.__bocompressReady === undefined) window.__bocompressReady = performance.now();
      document.body.dataset.ready = "1";
    } catch (e) {
      dot.className = "live-dot err";
      errBox.textContent = "Could not load jobs: " + e.message;
      show(errBox, true);
    }
    timer = setTimeout(tick, document.hidden ? REFRESH_MS * 5 : REFRESH_MS);
  }

  filter.addEventListener("change", () => { shown = 50; tick(); });
  more.addEventListener("click", () => { shown += 50; tick(); });
  document.addEventListener("visibilitychange", () => { if (!document.hidden && Date.now() - lastOk > REFRESH_MS) tick(); });
  tick();
})();
