// mta dashboard: polls GET /live?node=1 (the whole node) with the bearer token from sessionStorage, keeps a ring
// of points and draws them. Vanilla JS, no external fetch; every text from the daemon
// goes into the page as textContent (replies quote remote servers: never markup).
"use strict";
(function () {
  const KEY = "mta-admin-token";
  const POLL_MS = 2000;
  const RING = 180;                 // points kept: 6 minutes at 2 s
  const COLORS = ["#1e88e5", "#43a047", "#fb8c00", "#8e24aa", "#e53935", "#00897b",
                  "#6d4c41", "#3949ab", "#c0ca33", "#d81b60"];
  const $ = (id) => document.getElementById(id);
  let timer = null, prev = null, history = [], lastView = null, busy = false;

  function token() { return sessionStorage.getItem(KEY); }

  async function api(path, body) {
    const ctl = new AbortController();
    const t = setTimeout(() => ctl.abort(), 8000);
    const opts = { headers: { "Authorization": "Bearer " + token() }, signal: ctl.signal,
                   cache: "no-store" };
    if (body !== undefined) {
      opts.method = "POST";
      opts.headers["Content-Type"] = "application/json";
      opts.body = JSON.stringify(body);
    }
    try {
      const resp = await fetch(path, opts);
      let data = null;
      try { data = await resp.json(); } catch (e) { data = null; }
      return { status: resp.status, data: data };
    } finally {
      clearTimeout(t);
    }
  }

  function showLogin(message) {
    if (timer !== null) { clearInterval(timer); timer = null; }
    $("main").hidden = true;
    $("login").hidden = false;
    $("logout").hidden = true;
    $("login-error").textContent = message || "";
    $("status").textContent = "signed out";
  }

  function start() {
    $("login").hidden = true;
    $("main").hidden = false;
    $("logout").hidden = false;
    prev = null; history = [];
    poll();
    timer = setInterval(poll, POLL_MS);
  }

  async function poll() {
    if (busy) return;
    busy = true;
    try {
      // node=1: every worker process of the node (one process: the same as without it)
      const r = await api("/live?node=1");
      if (r.status === 401) { sessionStorage.removeItem(KEY); showLogin("the daemon refused that token"); return; }
      const partial = r.status === 502 && r.data && r.data.partial;
      if ((r.status !== 200 && !partial) || !r.data) { $("status").textContent = "error: HTTP " + r.status; return; }
      const view = partial ? r.data.partial : r.data;
      update(view);
      $("status").textContent = (partial ? "PARTIAL (" + r.data.error + "), " : "live, ") +
        "updated " + new Date(view.at * 1000).toLocaleTimeString();
    } catch (e) {
      $("status").textContent = "daemon unreachable (" + (e.name || "error") + ")";
    } finally {
      busy = false;
    }
  }

  function sum(rows, keyOf) {
    const out = {};
    for (const r of rows) {
      const k = keyOf(r);
      const o = out[k] || (out[k] = { delivered: 0, deferred: 0, bounced: 0 });
      o.delivered += r.delivered; o.deferred += r.deferred; o.bounced += r.bounced;
    }
    return out;
  }

  function rates(now, before, dt) {
    const out = {};
    for (const k of Object.keys(now)) {
      const b = before[k] || { delivered: 0, deferred: 0, bounced: 0 };
      out[k] = {};
      for (const f of ["delivered", "deferred", "bounced"]) {
        out[k][f] = Math.max(0, now[k][f] - b[f]) / dt;
      }
    }
    return out;
  }

  function fmt(x) { return x >= 100 ? x.toFixed(0) : x.toFixed(1); }

  function update(v) {
    const snap = { at: v.at, totals: v.outcomes, bySite: sum(v.rows, (r) => r.site),
                   byProvider: sum(v.rows, (r) => r.provider), bySource: sum(v.rows, (r) => r.source) };
    let siteRates = {};
    if (prev !== null && v.at > prev.at) {
      const dt = v.at - prev.at;
      const tot = rates({ t: snap.totals }, { t: prev.totals }, dt).t;
      const point = { at: v.at, delivered: tot.delivered, deferred: tot.deferred, bounced: tot.bounced,
                      scheduled: v.scheduled, ready: v.ready, providers: {}, sources: {},
                      failing: {} };
      const pr = rates(snap.byProvider, prev.byProvider, dt);
      for (const k of Object.keys(pr)) {
        point.providers[k] = pr[k].delivered;
        point.failing[k] = pr[k].deferred + pr[k].bounced;
      }
      const sr = rates(snap.bySource, prev.bySource, dt);
      for (const k of Object.keys(sr)) point.sources[k] = sr[k].delivered;
      siteRates = rates(snap.bySite, prev.bySite, dt);
      history.push(point);
      if (history.length > RING) history.shift();
      $("t-delivered").textContent = fmt(tot.delivered);
      $("t-deferred").textContent = fmt(tot.deferred);
      $("t-bounced").textContent = fmt(tot.bounced);
    }
    prev = snap;
    lastView = v;
    $("t-delivered-total").textContent = String(v.outcomes.delivered);
    $("t-received").textContent = String(v.received);
    $("t-scheduled").textContent = String(v.scheduled);
    $("t-ready").textContent = String(v.ready);
    $("t-connections").textContent = String(v.connections);
    drawAll();
    renderSites(v, siteRates);
    renderHolds(v);
    renderErrors(v);
  }

  // -- plots -------------------------------------------------------------------------------

  function series(names, get) {
    return names.map((n, i) => ({ name: n, color: COLORS[i % COLORS.length],
                                  values: history.map((p) => get(p, n) || 0) }));
  }

  function keysOf(field) {
    const seen = {};
    for (const p of history) for (const k of Object.keys(p[field])) seen[k] = (seen[k] || 0) + p[field][k];
    return Object.keys(seen).sort((a, b) => seen[b] - seen[a]).slice(0, COLORS.length);
  }

  function drawAll() {
    draw("c-outcomes", "l-outcomes", [
      { name: "delivered", color: "#43a047", values: history.map((p) => p.delivered) },
      { name: "deferred", color: "#fb8c00", values: history.map((p) => p.deferred) },
      { name: "bounced", color: "#e53935", values: history.map((p) => p.bounced) }]);
    draw("c-queues", "l-queues", [
      { name: "scheduled", color: "#3949ab", values: history.map((p) => p.scheduled) },
      { name: "ready", color: "#00897b", values: history.map((p) => p.ready) }]);
    draw("c-providers", "l-providers", series(keysOf("providers"), (p, n) => p.providers[n]));
    draw("c-sources", "l-sources", series(keysOf("sources"), (p, n) => p.sources[n]));
    draw("c-failing", "l-failing", series(keysOf("failing"), (p, n) => p.failing[n]));
  }

  function draw(canvasId, legendId, lines) {
    const c = $(canvasId), g = c.getContext("2d");
    const w = c.width, h = c.height, left = 44, bottom = 16, top = 8;
    g.clearRect(0, 0, w, h);
    let max = 1;
    for (const s of lines) for (const x of s.values) if (x > max) max = x;
    max = niceCeil(max);
    g.strokeStyle = "#e0e0e0"; g.fillStyle = "#777"; g.font = "11px sans-serif"; g.lineWidth = 1;
    for (let i = 0; i <= 4; i++) {
      const y = top + (h - top - bottom) * i / 4;
      g.beginPath(); g.moveTo(left, y); g.lineTo(w, y); g.stroke();
      g.fillText(fmtAxis(max * (4 - i) / 4), 2, y + 4);
    }
    // the x axis spans the points held (at least a minute's worth, at most the ring)
    const span = Math.min(RING, Math.max(30, history.length));
    const secs = Math.round(span * POLL_MS / 1000);
    g.fillText(secs >= 120 ? "-" + Math.round(secs / 60) + " min" : "-" + secs + " s", left, h - 2);
    g.fillText("now", w - 24, h - 2);
    const step = (w - left) / (span - 1);
    for (const s of lines) {
      const n = s.values.length;
      if (n === 0) continue;
      g.strokeStyle = s.color; g.lineWidth = 2; g.beginPath();
      s.values.forEach((x, i) => {
        const px = w - (n - 1 - i) * step, py = top + (h - top - bottom) * (1 - x / max);
        if (i === 0) g.moveTo(px, py); else g.lineTo(px, py);
      });
      g.stroke();
    }
    const legend = $(legendId);
    legend.replaceChildren(...lines.map((s) => {
      const span = document.createElement("span"), i = document.createElement("i");
      i.style.background = s.color;
      const last = s.values.length ? s.values[s.values.length - 1] : 0;
      span.append(i, s.name + " " + fmt(last));
      return span;
    }));
  }

  function niceCeil(x) {
    const p = Math.pow(10, Math.floor(Math.log10(x)));
    for (const m of [1, 2, 5, 10]) if (x <= m * p) return m * p;
    return 10 * p;
  }

  function fmtAxis(x) {
    if (x >= 1000) return (x / 1000).toFixed(1) + "k";
    return x >= 10 ? x.toFixed(0) : x.toFixed(x >= 1 ? 1 : 2);
  }

  // -- tables ------------------------------------------------------------------------------

  function cell(tr, text, cls) {
    const td = document.createElement("td");
    td.textContent = text;
    if (cls) td.className = cls;
    tr.appendChild(td);
    return td;
  }

  function left(until) {
    const s = Math.max(0, Math.round(until - Date.now() / 1000));
    return Math.floor(s / 3600) + "h" + String(Math.floor(s / 60) % 60).padStart(2, "0") + "m" +
           String(s % 60).padStart(2, "0") + "s";
  }

  function renderSites(v, siteRates) {
    const sites = {};
    for (const r of v.rows) {
      const s = sites[r.site] || (sites[r.site] = { provider: r.provider, sources: [], scheduled: 0,
                                                    ready: 0, connections: 0, paused: false });
      s.sources.push(r.source);
      s.scheduled = Math.max(s.scheduled, r.scheduled);
      s.ready += r.ready; s.connections += r.connections;
      if (r.paused_until) s.paused = true;
    }
    const suspended = new Set(v.holds.filter((h) => h.kind === "site").map((h) => h.name));
    for (const name of suspended) if (!sites[name]) sites[name] = { provider: "", sources: [], scheduled: 0, ready: 0, connections: 0, paused: true };
    const body = $("sites").tBodies[0];
    const rows = Object.keys(sites).sort().map((name) => {
      const s = sites[name], rt = siteRates[name] || { delivered: 0, deferred: 0, bounced: 0 };
      const tr = document.createElement("tr");
      tr.dataset.site = name;
      cell(tr, name); cell(tr, s.provider); cell(tr, s.sources.join(" "));
      cell(tr, fmt(rt.delivered), "n"); cell(tr, fmt(rt.deferred), "n"); cell(tr, fmt(rt.bounced), "n");
      cell(tr, String(s.scheduled), "n"); cell(tr, String(s.ready), "n"); cell(tr, String(s.connections), "n");
      const isSuspended = suspended.has(name);
      cell(tr, isSuspended ? "suspended" : (s.paused ? "paused" : "running"),
           isSuspended || s.paused ? "suspended state" : "running state");
      const td = document.createElement("td"), b = document.createElement("button");
      b.type = "button";
      b.className = isSuspended ? "resume" : "suspend";
      b.dataset.site = name;
      b.textContent = isSuspended ? "resume" : "suspend 10 min";
      b.addEventListener("click", () => act(isSuspended ? "resume" : "suspend", name));
      td.appendChild(b); tr.appendChild(td);
      return tr;
    });
    body.replaceChildren(...rows);
  }

  async function act(verb, site) {
    const body = { kind: "site", name: site, site: "" };
    if (verb === "suspend") body.duration = 600;
    $("action-result").textContent = verb + " " + site + " ...";
    try {
      const r = await api("/control/" + verb + "?node=1", body);   // on every worker
      $("action-result").textContent = r.status === 200
        ? verb + " " + site + ": done"
        : verb + " " + site + ": " + ((r.data && r.data.error) || "HTTP " + r.status);
    } catch (e) {
      $("action-result").textContent = verb + " " + site + ": daemon unreachable";
    }
    poll();
  }

  function renderHolds(v) {
    const rows = v.holds.map((h) => {
      const tr = document.createElement("tr");
      cell(tr, h.kind); cell(tr, h.name); cell(tr, h.site || "");
      cell(tr, left(h.until), "n"); cell(tr, h.reason);
      return tr;
    });
    $("holds").tBodies[0].replaceChildren(...rows);
  }

  function renderErrors(v) {
    const rows = v.errors.slice(-20).reverse().map((e) => {
      const tr = document.createElement("tr");
      cell(tr, new Date(e.at * 1000).toLocaleTimeString()); cell(tr, e.kind);
      cell(tr, e.source); cell(tr, e.site); cell(tr, String(e.code)); cell(tr, e.text);
      return tr;
    });
    $("errors").tBodies[0].replaceChildren(...rows);
  }

  // -- sign in and out ---------------------------------------------------------------------

  $("login").addEventListener("submit", async (ev) => {
    ev.preventDefault();
    const t = $("token").value.trim();
    $("token").value = "";
    sessionStorage.setItem(KEY, t);
    const r = await api("/live?node=1").catch(() => ({ status: 0 }));
    if (r.status === 200 || r.status === 502) { start(); }
    else { sessionStorage.removeItem(KEY); showLogin(r.status === 401 ? "the daemon refused that token" : "daemon unreachable"); }
  });
  $("logout").addEventListener("click", () => { sessionStorage.removeItem(KEY); showLogin(""); });

  if (token()) start(); else showLogin("");
})();
