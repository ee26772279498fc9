/*
 * A small canvas plotting module for the dashboard (no dependencies): XY charts (points, lines,
 * steps; linear or log y) with hover tips and click-to-pick, and a bar chart with range bands.
 * Drawing 10,000 points is one path per series, so a full redraw takes a few milliseconds.
 */
(function () {
  "use strict";

  const FONT = '11px system-ui, -apple-system, "Segoe UI", Roboto, sans-serif';
  const INK = "#374151", GRID = "#eef0f4", AXIS = "#c7cbd3", MUTED = "#6b7280";
  let tipNode = null;

  function tip(text, x, y) {
    if (!tipNode) {
      tipNode = document.createElement("div");
      tipNode.className = "chart-tip hidden";
      document.body.appendChild(tipNode);
    }
    if (text === null) { tipNode.classList.add("hidden"); return; }
    tipNode.textContent = text;
    tipNode.classList.remove("hidden");
    const w = tipNode.offsetWidth, h = tipNode.offsetHeight;
    tipNode.style.left = Math.min(x + 14, window.innerWidth - w - 6) + "px";
    tipNode.style.top = Math.max(6, y - h - 10) + "px";
  }

  /** A tick label: short, exponent form for very small or large magnitudes. */
  function tickLabel(v) {
    if (v === 0) return "0";
    const a = Math.abs(v);
    if (a >= 1e5 || a < 1e-3) {
      const s = v.toExponential(1).replace(".0e", "e").replace("e+", "e");
      return s;
    }
    return String(Number(v.toPrecision(3)));
  }

  /** About n "nice" ticks (1, 2, 5 × 10^k steps) covering [lo, hi]. */
  function niceTicks(lo, hi, n) {
    if (!(hi > lo)) return [lo];
    const raw = (hi - lo) / Math.max(1, n);
    const mag = Math.pow(10, Math.floor(Math.log10(raw)));
    const step = [1, 2, 5, 10].map((m) => m * mag).find((s) => s >= raw) || 10 * mag;
    const out = [];
    for (let v = Math.ceil(lo / step) * step; v <= hi + step * 1e-9; v += step) out.push(Math.abs(v) < step * 1e-9 ? 0 : v);
    return out;
  }

  /** A scale mapping data to pixels: linear or log10. */
  function scale(lo, hi, p0, p1, log) {
    const f = log ? Math.log10 : (v) => v;
    const a = f(lo), b = f(hi);
    const k = b > a ? (p1 - p0) / (b - a) : 0;
    const map = (v) => p0 + (f(v) - a) * k;
    let ticks;
    if (log) {
      const e0 = Math.ceil(a - 1e-9), e1 = Math.floor(b + 1e-9);
      if (e1 - e0 >= 1) {
        const every = Math.max(1, Math.ceil((e1 - e0 + 1) / 6));
        ticks = [];
        for (let e = e0; e <= e1; e += every) ticks.push(Math.pow(10, e));
      } else {
        ticks = niceTicks(lo, hi, 4).filter((v) => v > 0);
      }
    } else {
      ticks = niceTicks(lo, hi, 5);
    }
    return { map, ticks, lo, hi, log };
  }

  /** Canvas set-up shared by the charts: device pixels, resize, hover and click. */
  class Base {
    constructor(canvas, opts) {
      this.canvas = canvas;
      this.opts = opts || {};
      this.ctx = canvas.getContext("2d");
      this.hits = [];          // [{x, y, id, text}] in CSS pixels, filled by draw()
      this.hover = null;
      this.drawn = 0;          // how many marks the last draw made (tests read it)
      if (window.ResizeObserver) new ResizeObserver(() => this.draw()).observe(canvas);
      canvas.addEventListener("mousemove", (e) => this._move(e));
      canvas.addEventListener("mouseleave", () => { tip(null); this.canvas.style.cursor = ""; });
      canvas.addEventListener("click", (e) => {
        const h = this._nearest(e);
        if (h && this.opts.onPick) this.opts.onPick(h.id);
      });
    }

    _size() {
      const dpr = window.devicePixelRatio || 1;
      const w = Math.max(50, this.canvas.clientWidth), h = Math.max(50, this.canvas.clientHeight);
      if (this.canvas.width !== Math.round(w * dpr) || this.canvas.height !== Math.round(h * dpr)) {
        this.canvas.width = Math.round(w * dpr);
        this.canvas.height = Math.round(h * dpr);
      }
      this.ctx.setTransform(dpr, 0, 0, dpr, 0, 0);
      this.ctx.clearRect(0, 0, w, h);
      this.ctx.font = FONT;
      return { w, h };
    }

    _nearest(e) {
      const r = this.canvas.getBoundingClientRect();
      const x = e.clientX - r.left, y = e.clientY - r.top;
      let best = null, bestD = (this.opts.pickRadius || 9) ** 2;
      for (const h of this.hits) {
        if (h.box) {
          if (x >= h.box[0] && x <= h.box[2] && y >= h.box[1] && y <= h.box[3]) return h;
          continue;
        }
        const d = (h.x - x) ** 2 + (h.y - y) ** 2;
        if (d < bestD) { bestD = d; best = h; }
      }
      return best;
    }

    _move(e) {
      const h = this._nearest(e);
      this.canvas.style.cursor = h && this.opts.onPick ? "pointer" : "";
      tip(h ? h.text() : null, e.clientX, e.clientY);
    }

    _empty(w, h, text) {
      const c = this.ctx;
      c.fillStyle = MUTED;
      c.textAlign = "center";
      c.textBaseline = "middle";
      c.fillText(text, w / 2, h / 2);
    }

    _axes(x0, y0, x1, y1, xs, ys, xLabel, yLabel) {
      const c = this.ctx;
      c.lineWidth = 1;
      c.strokeStyle = GRID;
      c.fillStyle = MUTED;
      c.beginPath();
      for (const t of ys.ticks) { const y = Math.round(ys.map(t)) + 0.5; c.moveTo(x0, y); c.lineTo(x1, y); }
      c.stroke();
      c.textAlign = "right"; c.textBaseline = "middle";
      for (const t of ys.ticks) c.fillText(tickLabel(t), x0 - 6, ys.map(t));
      if (xs) {
        c.textAlign = "center"; c.textBaseline = "top";
        for (const t of xs.ticks) c.fillText(tickLabel(t), xs.map(t), y1 + 6);
      }
      c.strokeStyle = AXIS;
      c.beginPath(); c.moveTo(x0 + 0.5, y0); c.lineTo(x0 + 0.5, y1 + 0.5); c.lineTo(x1, y1 + 0.5); c.stroke();
      c.fillStyle = INK;
      if (xLabel) { c.textAlign = "center"; c.textBaseline = "bottom"; c.fillText(xLabel, (x0 + x1) / 2, this.canvas.clientHeight - 2); }
      if (yLabel) {
        c.save(); c.translate(11, (y0 + y1) / 2); c.rotate(-Math.PI / 2);
        c.textAlign = "center"; c.textBaseline = "middle"; c.fillText(yLabel, 0, 0); c.restore();
      }
    }
  }

  /**
   * An XY chart. set(series, selectedId): series = [{name, kind: "points"|"line"|"step",
   * x: [..], y: [..], ids?: [..], color, radius?, pick?: bool, tip?: (i) => string, hollow?: bool}].
   * opts: {xLabel, yLabel, yLog: "auto"|true|false, onPick(id), empty: "text"}.
   */
  class XY extends Base {
    constructor(canvas, opts) { super(canvas, opts); this.series = []; this.selected = null; }

    set(series, selected) { this.series = series; this.selected = selected; this.draw(); }

    draw() {
      const { w, h } = this._size();
      this.hits = [];
      this.drawn = 0;
      const c = this.ctx;
      let xlo = Infinity, xhi = -Infinity, ylo = Infinity, yhi = -Infinity, yposlo = Infinity, n = 0;
      for (const s of this.series) {
        for (let i = 0; i < s.x.length; i++) {
          const x = s.x[i], y = s.y[i];
          if (!Number.isFinite(x) || !Number.isFinite(y)) continue;
          n++;
          if (x < xlo) xlo = x; if (x > xhi) xhi = x;
          if (y < ylo) ylo = y; if (y > yhi) yhi = y;
          if (y > 0 && y < yposlo) yposlo = y;
        }
      }
      if (n === 0) { this._empty(w, h, this.opts.empty || "No data yet"); return; }
      let log = this.opts.yLog === true || (this.opts.yLog === "auto" && ylo > 0 && yhi / ylo > 50);
      if (log && !(yposlo < Infinity)) log = false;
      if (log) { ylo = yposlo; const pad = Math.pow(yhi / ylo, 0.05); ylo /= pad; yhi *= pad; }
      else {
        if (yhi === ylo) { const d = Math.abs(yhi) * 0.1 || 1; ylo -= d; yhi += d; }
        const pad = (yhi - ylo) * 0.06; ylo -= pad; yhi += pad;
      }
      if (xhi === xlo) { xlo -= 1; xhi += 1; }
      const xpad = (xhi - xlo) * 0.03; xlo -= xpad; xhi += xpad;
      const L = 58, R = w - 14, T = 10, B = h - 38;
      const xs = scale(xlo, xhi, L, R, false), ys = scale(ylo, yhi, B, T, log);
      this._axes(L, T, R, B, xs, ys, this.opts.xLabel, this.opts.yLabel);
      c.save();
      c.beginPath(); c.rect(L, T - 4, R - L + 4, B - T + 8); c.clip();
      let selHit = null;
      for (const s of this.series) {
        const px = new Array(s.x.length);
        if (s.kind === "line" || s.kind === "step") {
          c.strokeStyle = s.color; c.lineWidth = s.width || 2; c.lineJoin = "round";
          c.beginPath();
          let started = false, prevY = 0;
          for (let i = 0; i < s.x.length; i++) {
            const x = s.x[i], y = s.y[i];
            if (!Number.isFinite(x) || !Number.isFinite(y) || (log && y <= 0)) continue;
            const X = xs.map(x), Y = ys.map(y);
            if (!started) { c.moveTo(X, Y); started = true; }
            else if (s.kind === "step") { c.lineTo(X, prevY); c.lineTo(X, Y); }
            else c.lineTo(X, Y);
            prevY = Y;
            this.drawn++;
          }
          if (started && s.extendTo !== undefined && s.kind === "step") c.lineTo(xs.map(s.extendTo), prevY);
          c.stroke();
        }
        if (s.kind === "points" || s.markers) {
          const r = s.radius || 2.5;
          c.beginPath();
          for (let i = 0; i < s.x.length; i++) {
            const x = s.x[i], y = s.y[i];
            if (!Number.isFinite(x) || !Number.isFinite(y) || (log && y <= 0)) continue;
            const X = xs.map(x), Y = ys.map(y);
            c.moveTo(X + r, Y); c.arc(X, Y, r, 0, 2 * Math.PI);
            this.drawn++;
            if (s.pick && s.ids) {
              const hit = { x: X, y: Y, id: s.ids[i], text: () => (s.tip ? s.tip(i) : "") };
              this.hits.push(hit);
              if (this.selected !== null && s.ids[i] === this.selected) selHit = hit;
            }
          }
          if (s.hollow) { c.strokeStyle = s.color; c.lineWidth = 1.2; c.stroke(); }
          else { c.fillStyle = s.color; c.fill(); if (s.stroke) { c.strokeStyle = s.stroke; c.lineWidth = 1; c.stroke(); } }
        }
      }
      if (selHit) {
        c.strokeStyle = "#111827"; c.lineWidth = 2;
        c.beginPath(); c.arc(selHit.x, selHit.y, 7, 0, 2 * Math.PI); c.stroke();
      }
      c.restore();
    }
  }

  /**
   * Bars with a range band behind each: set({labels, values, lows, highs, tips}).
   * opts: {yLabel, yMax, empty}.
   */
  class Bars extends Base {
    constructor(canvas, opts) { super(canvas, opts); this.data = null; }

    set(data) { this.data = data; this.draw(); }

    draw() {
      const { w, h } = this._size();
      this.hits = [];
      this.drawn = 0;
      const d = this.data;
      if (!d || !d.values.length) { this._empty(w, h, this.opts.empty || "No trial selected"); return; }
      const c = this.ctx;
      const n = d.values.length;
      const longest = Math.max(...d.labels.map((s) => c.measureText(s.length > 22 ? s.slice(0, 21) + "…" : s).width));
      const L = 52, R = w - 10, T = 10;
      const slot = (R - L) / n;
      const rotate = longest > slot - 6;
      const everyK = rotate ? Math.max(1, Math.ceil(14 / slot)) : 1;
      const B = h - (rotate ? Math.min(110, longest * 0.72 + 16) : 30);
      let ymax = this.opts.yMax || 0;
      for (let i = 0; i < n; i++) ymax = Math.max(ymax, d.values[i] || 0, (d.highs && d.highs[i]) || 0);
      const ys = scale(0, ymax * 1.02 || 1, B, T, false);
      this._axes(L, T, R, B, null, ys, null, this.opts.yLabel);
      const bw = Math.max(1, Math.min(46, slot * 0.62));
      for (let i = 0; i < n; i++) {
        const cx = L + slot * (i + 0.5);
        if (d.lows && d.highs) {
          c.fillStyle = "#e8edf7";
          const y0 = ys.map(d.highs[i]), y1 = ys.map(d.lows[i]);
          c.fillRect(cx - bw / 2 - 3, y0, bw + 6, y1 - y0);
        }
        const v = d.values[i];
        if (Number.isFinite(v)) {
          const y = ys.map(v);
          c.fillStyle = d.colors ? d.colors[i] : "#2563eb";
          c.fillRect(cx - bw / 2, y, bw, B - y);
          this.drawn++;
        }
        this.hits.push({ box: [cx - slot / 2, T, cx + slot / 2, B], id: i,
                         text: () => (d.tips ? d.tips[i] : d.labels[i] + ": " + tickLabel(v)) });
        if (i % everyK === 0) {
          const s = d.labels[i].length > 22 ? d.labels[i].slice(0, 21) + "…" : d.labels[i];
          c.fillStyle = INK;
          if (rotate) {
            c.save(); c.translate(cx, B + 6); c.rotate(-Math.PI / 4);
            c.textAlign = "right"; c.textBaseline = "middle"; c.fillText(s, 0, 0); c.restore();
          } else {
            c.textAlign = "center"; c.textBaseline = "top"; c.fillText(s, cx, B + 6);
          }
        }
      }
    }
  }

  /**
   * Indices of the non-dominated points, both coordinates minimized (same rule as the service).
   * @param {number[]} a first coordinate; @param {number[]} b second; returns indices sorted by a.
   */
  function paretoFront(a, b) {
    const order = a.map((_, i) => i).filter((i) => Number.isFinite(a[i]) && Number.isFinite(b[i]));
    order.sort((i, j) => a[i] - a[j] || b[i] - b[j]);
    const out = [];
    let best = Infinity;
    for (const i of order) if (b[i] < best) { out.push(i); best = b[i]; }
    return out;
  }

  window.BCPlot = { XY, Bars, paretoFront, tickLabel };
})();
