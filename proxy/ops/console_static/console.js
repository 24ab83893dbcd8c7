// regproxy console: fetches /_regproxy/api/* and renders it. No framework, no build step.
// Every figure also carries its exact value in a data-value attribute (for scripts and tests).
"use strict";

const API = "/_regproxy/api/";
const REFRESH_MS = 5000;
const SVG = "http://www.w3.org/2000/svg";

function $(id) { return document.getElementById(id); }

function bytes(n) {
  if (n === null || n === undefined) return "–";
  const units = ["B", "KiB", "MiB", "GiB", "TiB", "PiB"];
  let i = 0;
  let v = n;
  while (Math.abs(v) >= 1024 && i < units.length - 1) { v /= 1024; i++; }
  return (i === 0 ? String(v) : v.toFixed(v < 10 ? 2 : 1)) + " " + units[i];
}
function percent(r) { return r === null || r === undefined ? "–" : (r * 100).toFixed(1) + " %"; }
function count(n) { return n === null || n === undefined ? "–" : Number(n).toLocaleString("en"); }
function ago(at) {
  if (!at) return "–";
  const s = Math.max(0, Date.now() / 1000 - at);
  if (s < 60) return Math.round(s) + " s ago";
  if (s < 3600) return Math.round(s / 60) + " min ago";
  return (s / 3600).toFixed(1) + " h ago";
}
function duration(s) {
  if (s === null || s === undefined) return "–";
  if (s < 90) return Math.round(s) + " s";
  if (s < 5400) return Math.round(s / 60) + " min";
  return (s / 3600).toFixed(1) + " h";
}
function shortDigest(d) { return d ? d.replace(/^(sha256:)?(.{12}).*$/, "$2") : ""; }

function setFigure(id, text, value) {
  const el = $(id);
  el.textContent = text;
  el.setAttribute("data-value", value === null || value === undefined ? "" : String(value));
}

function cell(text, opts) {
  const td = document.createElement("td");
  const o = opts || {};
  if (o.cls) td.className = o.cls;
  if (o.value !== undefined) td.setAttribute("data-value", o.value === null ? "" : String(o.value));
  if (o.title) td.title = o.title;
  if (o.node) td.appendChild(o.node); else td.textContent = text;
  return td;
}
function badge(text, cls) {
  const b = document.createElement("span");
  b.className = "badge " + cls;
  b.textContent = text;
  return b;
}
function fillTable(id, rows, columns, empty, rowData) {
  const body = $(id).tBodies[0];
  body.replaceChildren();
  if (!rows.length) {
    const tr = document.createElement("tr");
    const td = cell(empty, { cls: "empty" });
    td.colSpan = columns;
    tr.appendChild(td);
    body.appendChild(tr);
    return;
  }
  for (const row of rows) {
    const tr = document.createElement("tr");
    for (const [k, v] of Object.entries(rowData(row, tr))) { if (k) tr.setAttribute("data-" + k, v); }
    body.appendChild(tr);
  }
}

function renderSummary(s) {
  $("replica-host").textContent = s.replica.hostname;
  $("replica-instance").textContent = s.replica.instance;
  const st = s.storage;
  setFigure("storage-used", bytes(st.used_bytes), st.used_bytes);
  setFigure("storage-limit", st.limit_bytes ? bytes(st.limit_bytes) : "unbounded", st.limit_bytes);
  setFigure("storage-high", st.high_watermark_bytes ? bytes(st.high_watermark_bytes) + " (" + percent(st.high_watermark) + ")" : "–", st.high_watermark_bytes);
  setFigure("storage-low", st.low_watermark_bytes ? bytes(st.low_watermark_bytes) + " (" + percent(st.low_watermark) + ")" : "–", st.low_watermark_bytes);
  const meter = $("storage-meter");
  meter.value = st.used_fraction || 0;
  meter.high = st.high_watermark;
  meter.low = st.low_watermark;
  meter.optimum = 0;
  meter.textContent = st.used_fraction === null ? bytes(st.used_bytes) + " used, no limit" : percent(st.used_fraction) + " of the limit";
  meter.setAttribute("aria-valuetext", meter.textContent);

  const t = s.traffic;
  setFigure("hit-ratio", percent(t.hit_ratio), t.hit_ratio);
  setFigure("bytes-cache", bytes(t.bytes_from_cache), t.bytes_from_cache);
  setFigure("bytes-upstream", bytes(t.bytes_from_upstream), t.bytes_from_upstream);
  setFigure("requests-saved", count(t.upstream_requests_saved), t.upstream_requests_saved);
  setFigure("hits-misses", count(t.hits) + " / " + count(t.misses), t.hits + "/" + t.misses);
  setFigure("upstream-requests", count(t.upstream_requests), t.upstream_requests);

  fillTable("upstreams", s.upstreams, 6, "No upstreams configured", (u, tr) => {
    tr.append(
      cell(null, { node: document.createTextNode(u.name), title: u.url }),
      cell(null, { node: badge(u.health, u.health), value: u.health }),
      cell(u.last_error ? u.last_error + " (" + ago(u.last_error_at) + ")" : "none", { value: u.last_error || "" }),
      cell(u.ratelimit_remaining === null ? "not limited" : count(u.ratelimit_remaining), { cls: "num", value: u.ratelimit_remaining }),
      cell(duration(u.ratelimit_reset_seconds), { cls: "num", value: u.ratelimit_reset_seconds }),
      cell(count(u.requests), { cls: "num", value: u.requests }),
    );
    return { upstream: u.name };
  });

  fillTable("downloads", s.downloads, 5, "No downloads in flight", (d, tr) => {
    const bar = document.createElement("progress");
    bar.max = d.size || 1;
    if (d.size) bar.value = d.written;
    bar.textContent = d.progress === null ? "unknown" : percent(d.progress);
    bar.setAttribute("aria-label", "Download of " + shortDigest(d.digest) + ": " + bar.textContent);
    tr.append(
      cell(d.upstream + "/" + d.repository),
      cell(shortDigest(d.digest), { cls: "mono", title: d.digest }),
      cell(null, { node: bar, value: d.progress }),
      cell(bytes(d.written) + " of " + (d.size === null ? "?" : bytes(d.size)), { cls: "num", value: d.written }),
      cell(bytes(d.rate_bytes_per_second) + "/s", { cls: "num", value: d.rate_bytes_per_second }),
    );
    return { digest: d.digest };
  });

  fillTable("top-bytes", s.top_repositories.by_bytes, 3, "Nothing served yet", (r, tr) => {
    tr.append(cell(r.repository), cell(bytes(r.bytes), { cls: "num", value: r.bytes }),
      cell(count(r.pulls), { cls: "num", value: r.pulls }));
    return { repository: r.repository };
  });
  fillTable("top-pulls", s.top_repositories.by_pulls, 3, "No pulls yet", (r, tr) => {
    tr.append(cell(r.repository), cell(count(r.pulls), { cls: "num", value: r.pulls }),
      cell(bytes(r.bytes), { cls: "num", value: r.bytes }));
    return { repository: r.repository };
  });

  const ev = s.evicted;
  const tot = $("evicted-total");
  tot.textContent = "Since start: " + count(ev.total.blob) + " blobs, " + count(ev.total.manifest) + " manifests.";
  tot.setAttribute("data-value", ev.total.blob + ev.total.manifest);
  fillTable("evicted", ev.recent, 4, "Nothing evicted", (e, tr) => {
    tr.append(cell(ago(e.at), { value: e.at }), cell(e.kind),
      cell(shortDigest(e.digest), { cls: "mono", title: e.digest }),
      cell(bytes(e.size), { cls: "num", value: e.size }));
    return { digest: e.digest };
  });

  const pinned = $("pinned");
  pinned.replaceChildren();
  for (const p of s.pinned.length ? s.pinned : [null]) {
    const li = document.createElement("li");
    if (p === null) { li.textContent = "No images pinned (cache.pin)"; li.className = "muted"; }
    else { const c = document.createElement("code"); c.textContent = p; li.appendChild(c); li.setAttribute("data-value", p); }
    pinned.appendChild(li);
  }
  setFigure("fleet-replicas", count(s.fleet.replicas), s.fleet.replicas);
  setFigure("fleet-ratio", percent(s.fleet.hit_ratio), s.fleet.hit_ratio);
}

function svg(tag, attrs, text) {
  const el = document.createElementNS(SVG, tag);
  for (const [k, v] of Object.entries(attrs || {})) el.setAttribute(k, v);
  if (text !== undefined) el.textContent = text;
  return el;
}

function renderHistory(h) {
  const box = $("history-chart");
  const samples = h.samples;
  // Drawn at the box's own width in CSS pixels, so text keeps its size on any screen.
  const W = Math.max(280, Math.floor(box.clientWidth || 720)), H = 200, L = 64, R = 44, T = 10, B = 24;
  const root = svg("svg", { width: W, height: H, viewBox: `0 0 ${W} ${H}`, role: "img", "aria-labelledby": "history-title" });
  const last = samples[samples.length - 1];
  const title = last
    ? `Storage used ${bytes(last.used_bytes)}${last.limit_bytes ? " of " + bytes(last.limit_bytes) : ""}, hit ratio ${percent(last.hit_ratio)}, over ${samples.length} samples every ${h.sample_every_seconds} s`
    : "No samples yet";
  root.appendChild(svg("title", { id: "history-title" }, title));
  if (samples.length) {
    const t0 = samples[0].at, t1 = Math.max(last.at, t0 + 1);
    // Scale to what is used, so growth shows; take in the limit only when it is near.
    let maxUsed = Math.max(1024, ...samples.map((s) => s.used_bytes)) * 1.25;
    if (last.limit_bytes && last.limit_bytes <= maxUsed * 1.6) maxUsed = last.limit_bytes * 1.05;
    const x = (t) => L + ((t - t0) / (t1 - t0)) * (W - L - R);
    const y = (v) => T + (1 - v / maxUsed) * (H - T - B);
    const yr = (r) => T + (1 - r) * (H - T - B);
    root.append(
      svg("line", { class: "axis", x1: L, y1: H - B, x2: W - R, y2: H - B }),
      svg("line", { class: "axis", x1: L, y1: T, x2: L, y2: H - B }),
      svg("text", { x: L - 4, y: T + 10, "text-anchor": "end" }, bytes(maxUsed)),
      svg("text", { x: L - 4, y: H - B, "text-anchor": "end" }, "0"),
      svg("text", { x: W - R + 4, y: T + 10 }, "100 %"),
      svg("text", { x: W - R + 4, y: H - B }, "0 %"),
      svg("text", { x: L, y: H - 6 }, new Date(t0 * 1000).toLocaleTimeString()),
      svg("text", { x: W - R, y: H - 6, "text-anchor": "end" }, new Date(t1 * 1000).toLocaleTimeString()),
    );
    if (last.limit_bytes && last.limit_bytes <= maxUsed) {
      root.appendChild(svg("line", { class: "limit", x1: L, x2: W - R, y1: y(last.limit_bytes), y2: y(last.limit_bytes) }));
    }
    let area = `M${x(t0)},${y(0)}`;
    for (const s of samples) area += ` L${x(s.at).toFixed(1)},${y(s.used_bytes).toFixed(1)}`;
    area += ` L${x(last.at).toFixed(1)},${y(0)} Z`;
    root.appendChild(svg("path", { class: "used", d: area }));
    let line = "";
    for (const s of samples) {
      if (s.hit_ratio === null) continue;
      line += (line ? " L" : "M") + `${x(s.at).toFixed(1)},${yr(s.hit_ratio).toFixed(1)}`;
    }
    if (line) root.appendChild(svg("path", { class: "ratio", d: line }));
  }
  box.setAttribute("data-samples", String(samples.length));
  box.replaceChildren(root);
}

async function getJSON(path) {
  const resp = await fetch(API + path, { headers: { Accept: "application/json" }, cache: "no-store" });
  if (!resp.ok) {
    let msg = "HTTP " + resp.status;
    try { msg = (await resp.json()).errors[0].message || msg; } catch (e) { /* not JSON */ }
    throw new Error(msg);
  }
  return resp.json();
}

async function refresh() {
  const status = $("status");
  try {
    const [summary, history] = await Promise.all([getJSON("summary"), getJSON("history")]);
    renderSummary(summary);
    renderHistory(history);
    const now = new Date();
    const upd = $("updated");
    upd.textContent = now.toLocaleTimeString();
    upd.dateTime = now.toISOString();
    status.textContent = "Live: refreshes every " + REFRESH_MS / 1000 + " s.";
    status.className = "status";
    document.body.setAttribute("data-loaded", "true");
  } catch (err) {
    status.textContent = "Could not refresh: " + err.message;
    status.className = "status error";
  }
}

// The trust policy's view of a platform (policy: in the configuration); "—" without one.
function signedText(t) {
  if (!t || !t.rule) return "—";
  if (t.rule !== "require_signature") return t.rule + " (entry " + t.policy_entry + ")";
  if (t.signed) return "yes: " + (t.key || "index") + (t.via ? " (via index)" : "");
  return "no: " + (t.reason || "not signed");
}

async function inspect(ev) {
  ev.preventDefault();
  const image = $("inspect-image").value.trim();
  const out = $("inspect-summary");
  if (!image) return;
  out.textContent = "Looking up " + image + "…";
  try {
    const r = await getJSON("inspect?image=" + encodeURIComponent(image));
    out.textContent = r.image + " → " + r.digest + " (" + r.media_type + ")";
    fillTable("inspect", r.platforms, 7, "No platforms", (p, tr) => {
      tr.append(
        cell(p.platform + (p.attestation ? " (attestation)" : "")),
        cell(p.source),
        cell(shortDigest(p.digest), { cls: "mono", title: p.digest }),
        cell(bytes(p.size), { cls: "num", value: p.size }),
        // Layer sizes are in the platform's manifest: known once that is cached.
        cell(p.image_bytes === null ? "not known yet" : bytes(p.image_bytes), { cls: "num", value: p.image_bytes }),
        cell(null, { node: badge(p.cached, p.cached), value: p.cached }),
        cell(signedText(p.trust), { title: p.trust && p.trust.reason || "", value: p.trust ? String(p.trust.signed) : "" }),
      );
      return { platform: p.platform };
    });
  } catch (err) {
    out.textContent = "Inspect failed: " + err.message;
    $("inspect").tBodies[0].replaceChildren();
  }
}

document.addEventListener("DOMContentLoaded", () => {
  $("inspect-form").addEventListener("submit", inspect);
  const q = new URLSearchParams(location.search).get("image");
  if (q) { $("inspect-image").value = q; inspect(new Event("submit")); }
  refresh();
  setInterval(refresh, REFRESH_MS);
});
