// The relay's dashboard: polls the admin API once a second and draws what it
// answers. No library, no network beyond this origin; all text goes in
// through textContent.
"use strict";

const POLL_MS = 1000;
const WINDOW_S = 300; // what the charts show: the last five minutes
const SVG = "http://www.w3.org/2000/svg";

const $ = (id) => document.getElementById(id);
const number = new Intl.NumberFormat("en");
const samples = []; // {t (s since the epoch), published, lag}, oldest first
// The stream shown below the cluster table: ?stream=NAME, default "default".
const STREAM = (() => {
  const name = new URLSearchParams(location.search).get("stream") || "default";
  return /^[a-z0-9][a-z0-9-]{0,62}$/.test(name) ? name : "default";
})();
const api = (rest) => `/api/v1/streams/${encodeURIComponent(STREAM)}${rest}`;
// Each stream's published count over the last seconds, for its rate.
const published = new Map(); // stream -> [{t, n}]

function age(seconds) {
  if (seconds == null) return "–";
  const s = Math.round(seconds);
  if (s < 60) return `${s} s`;
  if (s < 3600) return `${Math.floor(s / 60)} min ${s % 60} s`;
  return `${Math.floor(s / 3600)} h ${Math.floor((s % 3600) / 60)} min`;
}

function text(id, value) {
  const element = $(id);
  if (element.textContent !== value) element.textContent = value;
}

// The admin token as entered under Control (Enter, or leaving the field),
// kept for this tab only.
let adminToken = sessionStorage.getItem("admin-token") || "";

function headers() {
  return adminToken ? { Accept: "application/json", Authorization: `Bearer ${adminToken}` } : { Accept: "application/json" };
}

function commitToken() {
  const token = $("token").value.trim();
  if (token === adminToken) return;
  adminToken = token;
  sessionStorage.setItem("admin-token", token);
  loadHistory().then(poll);
}

async function getJson(path) {
  const response = await fetch(path, { headers: headers(), cache: "no-store" });
  if (!response.ok) {
    const error = new Error(`${path} answered ${response.status}`);
    error.status = response.status;
    throw error;
  }
  return response.json();
}

// POSTs to the admin API with the token, and says what the server answered.
async function command(path, button, success) {
  commitToken();
  button.disabled = true;
  try {
    const response = await fetch(path, { method: "POST", headers: headers(), cache: "no-store" });
    const body = await response.json().catch(() => ({}));
    if (response.ok) {
      say(success(body), "ok");
    } else {
      const detail = body.detail || response.statusText;
      const code = body.code ? ` (${body.code})` : "";
      say(`${response.status}: ${detail}${code}`, "bad");
      if (response.status === 401) $("token").focus();
    }
  } catch (error) {
    say(`The admin API did not answer: ${error.message}`, "bad");
  } finally {
    button.disabled = false;
    poll();
  }
}

function say(message, tone) {
  const answer = $("answer");
  answer.className = tone;
  answer.textContent = message;
}

function cell(row, value, className) {
  const td = document.createElement("td");
  if (value instanceof Node) td.append(value); else td.textContent = value;
  if (className) td.className = className;
  row.append(td);
}

function link(href, label) {
  const a = document.createElement("a");
  a.href = href;
  a.textContent = label;
  return a;
}

const STATE_TONE = { running: "ok", idle: "ok", paused: "warn", halted: "bad", "no leader": "bad" };

// Items/s of a stream from the counts seen over the last 10 s.
function rateOf(stream, total) {
  const now = Date.now() / 1000;
  const seen = published.get(stream) || [];
  seen.push({ t: now, n: total });
  while (seen.length > 2 && seen[0].t < now - 10) seen.shift();
  published.set(stream, seen);
  const first = seen[0], last = seen[seen.length - 1];
  return last.t - first.t > 0 ? Math.max(0, (last.n - first.n) / (last.t - first.t)) : null;
}

function renderStreams(list, cluster) {
  const streams = list.streams || [];
  const replicas = cluster.replicas || [];
  const backlog = streams.reduce((sum, s) => sum + (s.backlog || 0), 0);
  const lag = Math.max(0, ...streams.map((s) => s.oldest_pending_age_seconds || 0));
  const stuck = streams.filter((s) => s.state === "halted" || s.state === "no leader").length;
  const paused = streams.filter((s) => s.state === "paused").length;
  let summary = `${streams.length} stream${streams.length === 1 ? "" : "s"} on ${replicas.length} replica${replicas.length === 1 ? "" : "s"}: `;
  summary += backlog === 0 ? "everything stored is published." : `${number.format(backlog)} batch${backlog === 1 ? "" : "es"} waiting, the oldest for ${age(lag)}.`;
  if (stuck) summary += ` ${stuck} stream${stuck === 1 ? "" : "s"} halted or without a leader.`;
  if (paused) summary += ` ${paused} paused.`;
  text("cluster-summary", summary);
  const byId = new Map(replicas.map((r) => [r.instance || r.relay_id, r]));
  $("streams").replaceChildren(...streams.map((s) => {
    const row = document.createElement("tr");
    if (s.stream === STREAM) {
      row.className = "selected";
      row.setAttribute("aria-current", "true");
    }
    cell(row, link(`?stream=${encodeURIComponent(s.stream)}`, s.stream));
    cell(row, s.topic);
    const leader = s.leader;
    if (!leader) {
      cell(row, "none", "bad");
    } else {
      const replica = byId.get(leader.instance || leader.relay_id);
      const url = leader.admin_url || (replica && replica.admin_url);
      const here = replica && replica.this;
      cell(row, here || !url ? `${leader.relay_id}${here ? " (this one)" : ""}`
        : link(`${url}/?stream=${encodeURIComponent(s.stream)}`, leader.relay_id));
    }
    cell(row, s.state, STATE_TONE[s.state] || "");
    cell(row, number.format(s.backlog));
    cell(row, age(s.oldest_pending_age_seconds));
    const rate = rateOf(s.stream, s.published_total || 0);
    cell(row, rate == null ? "–" : `${number.format(Math.round(rate))}/s`);
    return row;
  }));
  $("replicas").replaceChildren(...replicas.map((r) => {
    const item = document.createElement("li");
    const name = r.this ? `${r.relay_id} (this one)` : r.relay_id;
    item.append(r.this || !r.admin_url ? name : link(`${r.admin_url}/?stream=${encodeURIComponent(STREAM)}`, name));
    const leads = (r.leads || []).length ? `leads ${r.leads.join(", ")}` : "leads nothing";
    item.append(` · pid ${r.pid} on ${r.host || "?"} · ${leads}`);
    if (r.admin_token && r.admin_token !== "same") {
      const flag = document.createElement("span");
      flag.className = "bad";
      flag.textContent = r.admin_token === "none" ? " · admin API open (no token)" : " · another admin token";
      item.append(flag);
    }
    return item;
  }), ...(cluster.gone || []).map((r) => {
    const item = document.createElement("li");
    item.className = "muted";
    const when = r.gone_at ? new Date(r.gone_at).toLocaleTimeString() : "?";
    item.textContent = `${r.relay_id} · gone since ${when} (pid ${r.pid} on ${r.host || "?"})`;
    return item;
  }));
  renderSecurity(replicas, cluster);
}

// Every replica obeys what any of them stores (pauses, streams, replays):
// one replica without the token, or with another, opens the cluster. Two
// live processes under one name are flagged here too.
function renderSecurity(replicas, cluster) {
  const banner = $("security");
  const me = replicas.find((r) => r.this);
  const others = replicas.filter((r) => !r.this && r.admin_token && r.admin_token !== "same");
  const lines = [];
  if (me && me.admin_token === "none") lines.push("This replica's admin API is open: it runs without ADMIN_TOKEN (--admin-insecure-no-token).");
  if (others.length) lines.push(`${others.map((r) => `${r.relay_id} (${r.admin_token === "none" ? "no token" : "another token"})`).join(", ")}: give every replica the same ADMIN_TOKEN.`);
  const shared = cluster.duplicate_names || [];
  if (shared.length) lines.push(`More than one live process is named ${shared.join(", ")}: give each relay its own RELAY_ID.`);
  banner.hidden = lines.length === 0;
  text("security", lines.join(" "));
}

function renderStatus(status) {
  text("relay-id", status.relay_id);
  if (status.mongodb_unreachable_since) {
    const banner = $("offline");
    banner.textContent = `This replica cannot reach MongoDB since ${new Date(status.mongodb_unreachable_since).toLocaleTimeString()}: it leads nothing until it can; what only MongoDB can say is shown as unknown.`;
    banner.hidden = false;
  }
  // The chart is this replica's drain: say so when another one leads.
  const leaderName = status.leader && status.leader.relay_id;
  text("rate-caption", status.role === "leader"
    ? "Drain rate by this replica, the stream's leader (items/s)"
    : `Drain rate by this replica (items/s): it does not lead ${status.stream}${leaderName ? `; ${leaderName} does, its page has the stream's rate` : ""}`);
  text("stream-name", status.stream);
  text("stream-topic", `topic ${status.topic}`);
  const role = $("role");
  role.className = `badge ${status.role}`;
  text("role", status.role === "leader" ? `leader of ${status.stream}` : `standby for ${status.stream}`);
  const lease = status.lease || {};
  const leader = status.leader;
  const holder = $("holder");
  if (leader && leader.admin_url && (leader.instance || leader.relay_id) !== (status.instance || status.relay_id)) {
    holder.replaceChildren(link(`${leader.admin_url}/?stream=${encodeURIComponent(status.stream)}`, leader.relay_id));
  } else {
    text("holder", lease.error ? "unknown (MongoDB)" : lease.holder || "nobody");
  }
  text("epoch", lease.epoch == null ? "–" : String(lease.epoch));
  const state = $("state");
  if (status.halted) {
    state.className = "bad";
    text("state", `halted on batch ${status.halted.batch_sequence}`);
  } else if (status.paused) {
    state.className = "warn";
    text("state", "paused");
  } else {
    state.className = "ok";
    text("state", "running");
  }
  text("pending-count", status.pending_batches == null ? "–" : number.format(status.pending_batches));
  text("oldest", age(status.oldest_pending_age_seconds));
  text("published", number.format(status.cluster_published_total ?? status.published_total));

  const current = status.current_batch;
  $("current").hidden = !current;
  $("current-none").hidden = !!current;
  if (current) {
    const sent = current.sent ?? 0;
    text("current-label", `Batch ${current.batch_sequence} (${current.batch_id})`);
    const bar = $("current-progress");
    bar.max = Math.max(current.total_items, 1);
    bar.value = sent;
    const percent = current.progress_percentage == null ? "" : ` (${current.progress_percentage.toFixed(1)} %)`;
    text("current-count", `${number.format(sent)} of ${number.format(current.total_items)} items sent${percent}`);
  }

  const errors = $("errors");
  errors.replaceChildren(...(status.recent_errors || []).map((e) => {
    const item = document.createElement("li");
    const when = document.createElement("time");
    when.dateTime = e.at;
    when.textContent = new Date(e.at).toLocaleTimeString();
    item.append(when, ` ${e.message}`);
    return item;
  }));
  $("errors-none").hidden = errors.children.length > 0;
}

function renderFailed(status, pending) {
  const failed = new Map();
  if (status && status.halted) {
    const h = status.halted;
    failed.set(h.batch_id, { batch_id: h.batch_id, batch_sequence: h.batch_sequence, error: h.error });
  }
  for (const b of pending || []) {
    if (b.status === "failed" && !failed.has(b.batch_id)) failed.set(b.batch_id, { ...b, error: b.last_error });
  }
  const list = $("failed");
  // Rebuilt only when the set changes, so that a focused button keeps its focus.
  const key = [...failed.keys()].join(",");
  if (list.dataset.key === key) return;
  list.dataset.key = key;
  list.replaceChildren(...[...failed.values()].map(failedItem));
  $("failed-none").hidden = failed.size > 0;
}

// A failed batch: its error, how far it got, and a button to retry it.
function failedItem(b) {
  const item = document.createElement("li");
  item.dataset.batch = b.batch_id;
  const label = document.createElement("span");
  label.id = `failed-${b.batch_id}`;
  label.textContent = `Batch ${b.batch_sequence} (${b.batch_id}): ${b.error || "failed"}`;
  const bar = document.createElement("progress");
  bar.max = 1;
  bar.value = 0;
  bar.setAttribute("aria-labelledby", `${label.id} sent-${b.batch_id}`);
  const sent = document.createElement("span");
  sent.id = `sent-${b.batch_id}`;
  sent.className = "muted";
  getJson(api(`/batch/${encodeURIComponent(b.batch_id)}/status`)).then((s) => {
    bar.max = Math.max(s.items.total, 1);
    bar.value = s.items.sent + s.items.failed;
    sent.textContent = `${number.format(s.items.sent)} of ${number.format(s.items.total)} items sent`;
  }).catch(() => {});
  const button = document.createElement("button");
  button.type = "button";
  button.textContent = "Retry";
  button.setAttribute("aria-label", `Retry batch ${b.batch_sequence}`);
  button.addEventListener("click", () => command(
    api(`/batch/${encodeURIComponent(b.batch_id)}/retry`), button,
    (body) => `Batch ${body.batch_id} is ${body.status} again.`));
  item.append(label, bar, sent, button);
  return item;
}

// The stream's replay jobs, newest first: state, progress, rate, ETA.
function renderReplays(list) {
  const jobs = (list && list.replays) || [];
  $("replays").replaceChildren(...jobs.map((job) => {
    const item = document.createElement("li");
    const label = document.createElement("span");
    label.id = `replay-${job.replay_id}`;
    label.textContent = `Batches ${job.from_sequence}–${job.to_sequence} to ${job.topic}: ${job.state}`
      + (job.error ? ` (${job.error})` : "");
    const bar = document.createElement("progress");
    bar.max = Math.max(job.items_total, 1);
    bar.value = job.items_sent;
    bar.setAttribute("aria-labelledby", `${label.id} replay-count-${job.replay_id}`);
    const count = document.createElement("span");
    count.id = `replay-count-${job.replay_id}`;
    count.className = "muted";
    let detail = `${number.format(job.items_sent)} of ${number.format(job.items_total)} items, `
      + `${number.format(job.batches_sent)} of ${number.format(job.batches_total)} batches`;
    if (job.rate_items_per_second) detail += `, ${number.format(Math.round(job.rate_items_per_second))}/s`;
    if (job.eta_seconds != null && job.state === "running") detail += `, ${age(job.eta_seconds)} left`;
    count.textContent = detail;
    item.append(label, bar, count);
    return item;
  }));
  $("replays-none").hidden = jobs.length > 0;
}

function renderPending(page) {
  const now = Date.now();
  if (page.batches.length === 0) {
    const row = document.createElement("tr");
    const none = document.createElement("td");
    none.colSpan = 6;
    none.textContent = "None: everything stored in this stream is published.";
    row.append(none);
    $("pending").replaceChildren(row);
    text("pending-more", "");
    return;
  }
  $("pending").replaceChildren(...page.batches.map((b) => {
    const row = document.createElement("tr");
    const cells = [
      String(b.batch_sequence), b.batch_id, b.status, number.format(b.total_items),
      age((now - Date.parse(b.created_at)) / 1000), b.last_error || "",
    ];
    cells.forEach((value, i) => {
      const cell = document.createElement("td");
      cell.textContent = value;
      if (i === 5) cell.className = "error";
      row.append(cell);
    });
    return row;
  }));
  text("pending-more", page.next_cursor ? `(first ${page.batches.length})` : "");
}

// A time series as a line over the last WINDOW_S seconds.
function draw(id, points, unit, label) {
  const svg = $(id);
  const now = Date.now() / 1000;
  const shown = points.filter((p) => p.t >= now - WINDOW_S);
  const values = shown.map((p) => p.v);
  const peak = Math.max(1, ...values);
  const x = (t) => (300 * (t - (now - WINDOW_S))) / WINDOW_S;
  const y = (v) => 98 - (v / peak) * 94;
  const coords = shown.map((p) => `${x(p.t).toFixed(1)},${y(p.v).toFixed(1)}`).join(" ");
  const line = document.createElementNS(SVG, "polyline");
  line.setAttribute("class", "series");
  line.setAttribute("points", coords);
  const area = document.createElementNS(SVG, "polygon");
  area.setAttribute("class", "area");
  if (shown.length > 1) {
    area.setAttribute("points", `${x(shown[0].t).toFixed(1)},98 ${coords} ${x(shown[shown.length - 1].t).toFixed(1)},98`);
  }
  const base = document.createElementNS(SVG, "line");
  base.setAttribute("class", "grid");
  for (const [k, v] of Object.entries({ x1: 0, y1: 98, x2: 300, y2: 98 })) base.setAttribute(k, v);
  svg.replaceChildren(base, area, line);
  const last = values.length ? values[values.length - 1] : 0;
  const summary = `now ${number.format(Math.round(last))} ${unit}, peak ${number.format(Math.round(Math.max(0, ...values)))} ${unit}`;
  svg.setAttribute("aria-label", `${label}, last five minutes: ${summary}`);
  return summary;
}

function addSample(t, published, lag) {
  if (samples.length && t <= samples[samples.length - 1].t) return;
  samples.push({ t, published, lag: lag ?? 0 });
  while (samples.length && samples[0].t < t - WINDOW_S - 10) samples.shift();
}

function renderCharts(status) {
  addSample(Date.now() / 1000, status.published_total, status.oldest_pending_age_seconds);
  const rates = [];
  for (let i = 1; i < samples.length; i++) {
    const dt = samples[i].t - samples[i - 1].t;
    const dp = samples[i].published - samples[i - 1].published;
    rates.push({ t: samples[i].t, v: dt > 0 && dp > 0 ? dp / dt : 0 });
  }
  text("rate-now", draw("rate-chart", rates, "items/s", "Drain rate"));
  text("lag-now", draw("lag-chart", samples.map((s) => ({ t: s.t, v: s.lag })), "s", "Lag"));
}

// The replica's own record of the last minutes, so that a page opened now
// has charts at once.
async function loadHistory() {
  if (TOKEN_REQUIRED() && !adminToken) return;
  try {
    const history = await getJson(api("/history"));
    for (const s of history.samples) {
      addSample(Date.parse(s.at) / 1000, s.published_total, s.oldest_pending_age_seconds);
    }
  } catch (error) {
    // The live polls fill the charts anyway; the banner reports an outage.
  }
}

let lastStatus = null;
let lastPending = null;
let polling = false;

// The relay says in the page whether its admin API needs the token.
const TOKEN_REQUIRED = () => document.body.dataset.adminToken === "required";

async function poll() {
  if (polling) return;
  if (TOKEN_REQUIRED() && !adminToken) {
    const banner = $("offline");
    banner.textContent = "This relay's admin API needs its token: enter ADMIN_TOKEN under Control below and press Enter (kept for this tab only).";
    banner.hidden = false;
    return;
  }
  polling = true;
  try {
    const [streams, cluster] = await Promise.all([getJson("/api/v1/streams"), getJson("/api/v1/cluster")]);
    renderStreams(streams, cluster);
    const status = await getJson(api("/status"));
    lastStatus = status;
    renderStatus(status);
    renderCharts(status);
    lastPending = await getJson(api("/pending-batches?limit=20"));
    renderPending(lastPending);
    renderFailed(lastStatus, lastPending && lastPending.batches);
    renderReplays(await getJson(`/api/v1/outbox/replays?stream=${encodeURIComponent(STREAM)}`));
    $("offline").hidden = !lastStatus.mongodb_unreachable_since;
    text("updated", `updated ${new Date().toLocaleTimeString()}`);
  } catch (error) {
    const banner = $("offline");
    banner.textContent = error.status === 401
      ? "The admin token under Control below is not this relay's ADMIN_TOKEN."
      : `Cannot reach the admin API (${error.message}); retrying every second.`;
    banner.hidden = false;
  } finally {
    polling = false;
  }
}

document.addEventListener("DOMContentLoaded", () => {
  $("pause").addEventListener("click", (e) => command(api("/pause"), e.currentTarget,
    () => `Stream ${STREAM} paused on every replica.`));
  $("resume").addEventListener("click", (e) => command(api("/resume"), e.currentTarget,
    () => `Stream ${STREAM} resumed.`));
  $("status-link").href = api("/status");
  document.title = `batch-outbox relay · ${STREAM}`;
  $("controls").addEventListener("submit", (e) => {
    e.preventDefault();
    commitToken();
  });
  $("token").value = adminToken;
  $("token").addEventListener("change", commitToken);
  loadHistory().then(poll);
  setInterval(poll, POLL_MS);
});
