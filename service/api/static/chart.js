// Small SVG line charts: no library, nothing fetched from elsewhere.
"use strict";

const SVG = "http://www.w3.org/2000/svg";

function el(name, attrs, parent) {
  const node = document.createElementNS(SVG, name);
  for (const [k, v] of Object.entries(attrs)) node.setAttribute(k, v);
  if (parent) parent.appendChild(node);
  return node;
}

function fmt(v) {
  if (Math.abs(v) >= 1000) return (v / 1000).toFixed(1) + "k";
  return Math.abs(v) >= 10 ? v.toFixed(0) : v.toFixed(2);
}

// series: [{points: [[x, y], ...], color, dots: bool}]; draws into an <svg> with a viewBox.
function lineChart(svg, series, opts = {}) {
  while (svg.firstChild) svg.removeChild(svg.firstChild);
  const [, , width, height] = svg.getAttribute("viewBox").split(" ").map(Number);
  const pad = opts.axes === false ? 2 : 34;
  const all = series.flatMap((s) => s.points).filter((p) => Number.isFinite(p[1]));
  svg.dataset.points = String(series.reduce((n, s) => n + s.points.length, 0));
  if (all.length === 0) {
    if (opts.axes !== false) el("text", { x: width / 2 - 30, y: height / 2 }, svg).textContent = "no data yet";
    return;
  }
  let [x0, x1] = [Math.min(...all.map((p) => p[0])), Math.max(...all.map((p) => p[0]))];
  let [y0, y1] = [Math.min(...all.map((p) => p[1])), Math.max(...all.map((p) => p[1]))];
  if (x1 === x0) x1 = x0 + 1;
  if (y1 === y0) { y0 -= 1; y1 += 1; }
  const sx = (x) => pad + ((x - x0) / (x1 - x0)) * (width - pad - 6);
  const sy = (y) => height - pad + 10 - ((y - y0) / (y1 - y0)) * (height - pad - 4);
  if (opts.axes !== false) {
    el("line", { x1: pad, y1: sy(y0), x2: width - 6, y2: sy(y0), stroke: "#c5cad3" }, svg);
    el("line", { x1: pad, y1: sy(y0), x2: pad, y2: sy(y1), stroke: "#c5cad3" }, svg);
    el("text", { x: 2, y: sy(y1) + 4 }, svg).textContent = fmt(y1);
    el("text", { x: 2, y: sy(y0) }, svg).textContent = fmt(y0);
    el("text", { x: pad, y: height - 2 }, svg).textContent = fmt(x0);
    el("text", { x: width - 40, y: height - 2 }, svg).textContent = fmt(x1) + " fr.";
  }
  for (const s of series) {
    const pts = s.points.filter((p) => Number.isFinite(p[1]));
    if (s.dots) {
      for (const [x, y] of pts) el("circle", { cx: sx(x), cy: sy(y), r: 3, fill: s.color, class: "dot" }, svg);
    } else if (pts.length) {
      el("polyline", {
        points: pts.map(([x, y]) => `${sx(x).toFixed(1)},${sy(y).toFixed(1)}`).join(" "),
        fill: "none", stroke: s.color, "stroke-width": 1.5, class: "line",
      }, svg);
    }
  }
}
