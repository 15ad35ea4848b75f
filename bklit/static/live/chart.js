// Pageviews per minute as an inline SVG bar chart: built once, its bars moved on every update.

import * as format from "./format.js";

const SVG = "http://www.w3.org/2000/svg";
const WIDTH = 640;
const HEIGHT = 180;
const LEFT = 46;
const RIGHT = 6;
const TOP = 8;
const BOTTOM = 26;
const GRID_LINES = 4;

function element(name, attributes = {}, parent = null) {
  const node = document.createElementNS(SVG, name);
  for (const [key, value] of Object.entries(attributes)) {
    node.setAttribute(key, String(value));
  }
  if (parent) {
    parent.appendChild(node);
  }
  return node;
}

// A round upper bound for the y axis (4, 8, 20, 40, 60, 80, 200 ...) whose grid lines are whole numbers.
function niceMax(value) {
  const floor = Math.max(GRID_LINES, value);
  const magnitude = 10 ** Math.floor(Math.log10(floor));
  for (const step of [1, 2, 4, 6, 8, 10]) {
    const candidate = step * magnitude;
    if (candidate >= floor && Number.isInteger(candidate / GRID_LINES)) {
      return candidate;
    }
  }
  return 10 * magnitude;
}

export class Chart {
  constructor(container, minutes = 60) {
    this.minutes = minutes;
    this.svg = element("svg", {
      viewBox: `0 0 ${WIDTH} ${HEIGHT}`,
      role: "img",
      "aria-labelledby": "chart-title chart-summary",
      preserveAspectRatio: "xMidYMid meet",
    });
    this.summary = element("desc", { id: "chart-summary" }, this.svg);
    this.grid = element("g", {}, this.svg);
    this.gridLines = [];
    for (let i = 0; i <= GRID_LINES; i += 1) {
      const y = TOP + ((HEIGHT - TOP - BOTTOM) * i) / GRID_LINES;
      const line = element("line", { class: "grid", x1: LEFT, x2: WIDTH - RIGHT, y1: y, y2: y }, this.grid);
      const label = element("text", { class: "axis-label", x: LEFT - 6, y: y + 4, "text-anchor": "end" }, this.grid);
      this.gridLines.push({ line, label, fraction: 1 - i / GRID_LINES });
    }
    this.bars = [];
    const slot = (WIDTH - LEFT - RIGHT) / minutes;
    for (let i = 0; i < minutes; i += 1) {
      const rect = element("rect", { class: "bar", x: LEFT + i * slot + 1, width: Math.max(1, slot - 2), y: HEIGHT - BOTTOM, height: 0 }, this.svg);
      const title = element("title", {}, rect);
      this.bars.push({ rect, title });
    }
    this.timeLabels = [];
    for (let i = 0; i < minutes; i += 15) {
      const label = element("text", { class: "axis-label", x: LEFT + i * slot, y: HEIGHT - 6, "text-anchor": "start" }, this.svg);
      this.timeLabels.push({ label, index: i });
    }
    this.nowLabel = element("text", { class: "axis-label", x: WIDTH - RIGHT, y: HEIGHT - 6, "text-anchor": "end" }, this.svg);
    container.replaceChildren(this.svg);
  }

  // points: [{minute: epoch ms of the minute's start, pageviews}], oldest first, one per minute.
  update(points) {
    const max = niceMax(Math.max(0, ...points.map((p) => p.pageviews)));
    const plot = HEIGHT - TOP - BOTTOM;
    points.forEach((point, i) => {
      const bar = this.bars[i];
      const height = (plot * point.pageviews) / max;
      bar.rect.setAttribute("y", String(HEIGHT - BOTTOM - height));
      bar.rect.setAttribute("height", String(height));
      bar.rect.classList.toggle("now", i === points.length - 1);
      bar.title.textContent = `${format.minute(point.minute)}: ${format.counted(point.pageviews, "pageview")}`;
    });
    for (const { label, fraction } of this.gridLines) {
      label.textContent = format.count(max * fraction);
    }
    for (const { label, index } of this.timeLabels) {
      label.textContent = points[index] ? format.minute(points[index].minute) : "";
    }
    this.nowLabel.textContent = "now";
    const total = points.reduce((sum, p) => sum + p.pageviews, 0);
    const peak = points.reduce((best, p) => (p.pageviews > best.pageviews ? p : best), points[0] || { pageviews: 0 });
    this.summary.textContent = total
      ? `${format.counted(total, "pageview")} in the last ${points.length} minutes; the busiest minute, ${format.minute(peak.minute)}, had ${format.count(peak.pageviews)}.`
      : `No pageviews in the last ${points.length} minutes.`;
  }
}
