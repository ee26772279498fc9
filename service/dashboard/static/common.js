/* Shared helpers for the dashboard pages: API access, formatting, DOM building. No dependencies. */
(function () {
  "use strict";

  /** An API error with its HTTP status and the service's {detail, code}. */
  class ApiError extends Error {
    constructor(status, detail, code) {
      super(detail || ("HTTP " + status));
      this.status = status;
      this.code = code || "";
    }
  }

  const authOn = document.body.dataset.auth === "1";

  /** Send the browser to the sign-in page, coming back here afterwards. */
  function toLogin() {
    const next = location.pathname + location.search;
    location.assign("/login?next=" + encodeURIComponent(next));
  }

  /**
   * Fetch a JSON API path with the sign-in cookie (GET) or a bearer token (writes).
   * Returns {data, headers}; throws ApiError on a 4xx/5xx. A 401 on a read sends the browser to sign in.
   */
  async function api(path, opts) {
    opts = opts || {};
    const headers = Object.assign({ "Accept": "application/json" }, opts.headers || {});
    if (opts.token) headers["Authorization"] = "Bearer " + opts.token;
    if (opts.body !== undefined) headers["Content-Type"] = "application/json";
    const resp = await fetch(path, {
      method: opts.method || "GET", headers: headers, credentials: "same-origin", cache: "no-store",
      body: opts.body === undefined ? undefined : JSON.stringify(opts.body),
    });
    let data = null;
    const text = await resp.text();
    if (text) {
      try { data = JSON.parse(text); } catch (e) { data = { detail: text }; }
    }
    if (!resp.ok) {
      if (resp.status === 401 && authOn && !opts.token) { toLogin(); }
      throw new ApiError(resp.status, data && data.detail, data && data.code);
    }
    return { data: data, headers: resp.headers };
  }

  /** A number in a short, readable form (3 significant digits; exponent when tiny or huge). */
  function fmt(x, digits) {
    if (x === null || x === undefined || x === "") return "–";
    const v = Number(x);
    if (!Number.isFinite(v)) return String(x);
    if (v === 0) return "0";
    const a = Math.abs(v);
    if (a >= 1e5 || a < 1e-3) return v.toExponential((digits || 3) - 1);
    return String(Number(v.toPrecision(digits || 3)));
  }

  /** Seconds as "12 s", "5 min", "3 h", "2 d". */
  function fmtSecs(s) {
    if (!Number.isFinite(s)) return "–";
    s = Math.max(0, s);
    if (s < 60) return (s < 10 ? s.toFixed(1) : Math.round(s)) + " s";
    if (s < 3600) return Math.round(s / 60) + " min";
    if (s < 86400) return (s / 3600).toFixed(s < 36000 ? 1 : 0) + " h";
    return Math.round(s / 86400) + " d";
  }

  /** Age of an ISO timestamp relative to now. */
  function age(iso) {
    if (!iso) return "–";
    return fmtSecs((Date.now() - Date.parse(iso)) / 1000);
  }

  /** Build an element: el("td", {className: "num", title: "…"}, "text" | Node | [children]). */
  function el(tag, props, children) {
    const node = document.createElement(tag);
    if (props) {
      for (const k of Object.keys(props)) {
        if (k === "dataset") Object.assign(node.dataset, props[k]);
        else if (k === "style") Object.assign(node.style, props[k]);
        else node[k] = props[k];
      }
    }
    const add = (c) => {
      if (c === null || c === undefined || c === false) return;
      node.appendChild(typeof c === "string" || typeof c === "number" ? document.createTextNode(String(c)) : c);
    };
    if (Array.isArray(children)) children.forEach(add); else add(children);
    return node;
  }

  /** A state badge. */
  function badge(state) {
    return el("span", { className: "badge s-" + state }, state);
  }

  /** Number of finished trials (completed, failed or abandoned) from a job's counts. */
  function finished(counts) {
    counts = counts || {};
    return (counts.completed || 0) + (counts.failed || 0) + (counts.abandoned || 0);
  }

  /** The value a job minimizes or maximizes, for display: {metric, direction}. */
  function objectiveOf(job) {
    if (job.kind === "compression") return { metric: "objective", direction: "minimize" };
    const o = (job.spec && job.spec.objective) || {};
    return { metric: o.metric || "objective", direction: o.direction || "minimize" };
  }

  /** Show or hide an element. */
  function show(node, on) { node.classList.toggle("hidden", !on); }

  window.BC = { ApiError, api, fmt, fmtSecs, age, el, badge, finished, objectiveOf, show, authOn, toLogin };
})();
