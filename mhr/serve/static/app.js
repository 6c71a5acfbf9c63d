// The page of `mhr serve`: plain JS over the JSON API (no framework, no build step).
"use strict";

const $ = (sel) => document.querySelector(sel);
const state = { health: null, prior: null, baseline: null, timer: null, seq: 0 };
const PALETTE = ["#4e79a7", "#f28e2b", "#e15759", "#76b7b2", "#59a14f", "#edc948", "#b07aa1", "#ff9da7",
                 "#9c755f", "#79706e", "#2f6f9f", "#c95f1e"];

function colour(prior, group) {
  const names = (state.health && state.health.priors[prior]) || [];
  const i = names.indexOf(group);
  return PALETTE[(i < 0 ? 0 : i) % PALETTE.length];
}

function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (k === "class") node.className = v; else if (k === "style") node.style.cssText = v; else node.setAttribute(k, v);
  }
  for (const c of children) node.append(c instanceof Node ? c : document.createTextNode(String(c)));
  return node;
}

function chips(groups) {
  const span = el("span");
  const prior = state.prior;
  for (const g of (groups && groups[prior]) || []) {
    span.append(el("span", { class: "chip", style: `background:${colour(prior, g)}`, "data-group": g }, g));
  }
  return span;
}

async function api(path, options) {
  const res = await fetch(path, options);
  const body = await res.json().catch(() => ({ error: `HTTP ${res.status}` }));
  if (!res.ok) {
    const where = body.field ? ` (${body.field})` : "";
    throw new Error(`${body.error || res.statusText}${where}${body.hint ? " — " + body.hint : ""}`);
  }
  return body;
}

function showError(message) {
  const box = $("#error");
  box.hidden = !message;
  box.textContent = message || "";
}

function objectives() {
  // the decoding-time objectives chosen on the page, as API parameters (empty: the plain ranking)
  if (!state.health || !state.health.objectives) return {};
  const group = $("#steer-group").value;
  const out = {};
  const beta = Number($("#boost").value), share = Number($("#quota").value);
  if (group && beta > 0) out.boost = [`${state.prior}:${group}=${beta}`];
  if (group && share > 0) out.steer = [`${state.prior}:${group}=${share}`];
  if ($("#calibrate").checked) {
    out.calibrate = state.prior;
    out.calibrate_lambda = Number($("#calibrate-lambda").value);
  }
  return out;
}

function pastedHistory() {
  return $("#history").value.split(/[\s,]+/).filter((s) => s.length > 0);
}

async function rank(extra) {
  const k = Number($("#k").value) || 10;
  const pasted = pastedHistory();
  if (pasted.length > 0) {
    return api("/recommend", { method: "POST", headers: { "content-type": "application/json" },
                               body: JSON.stringify({ history: pasted, k, ...extra }) });
  }
  const params = new URLSearchParams({ user: $("#user").value.trim(), k: String(k) });
  for (const [key, value] of Object.entries(extra)) {
    for (const v of [].concat(value)) params.append(key, String(v));
  }
  return api(`/recommend?${params}`);
}

async function refresh(withBaseline) {
  const seq = ++state.seq;
  showError("");
  try {
    const extra = objectives();
    const steered = Object.keys(extra).length > 0;
    if (withBaseline || !state.baseline) state.baseline = await rank({ profile: true });
    const answer = steered ? await rank(extra) : state.baseline;
    if (seq !== state.seq) return;  // a newer request is under way
    renderList(answer, steered ? state.baseline : null);
    renderBars($("#exposure"), answer.exposure[state.prior] || {}, steered ? state.baseline.exposure[state.prior] : null);
    renderHistory(state.baseline);
  } catch (e) {
    if (seq === state.seq) showError(e.message);
  }
}

function renderList(answer, baseline) {
  $("#k-shown").textContent = answer.k;
  const note = [];
  if (answer.user) note.push(`user ${answer.user}`);
  note.push(`${answer.fusion} fusion`);
  if (baseline) note.push("steered; change vs the plain list");
  $("#list-note").textContent = note.join(" · ");
  const before = new Map(baseline ? baseline.items.map((r) => [r.item, r.rank]) : []);
  const body = $("#recs tbody");
  body.replaceChildren();
  for (const r of answer.items) {
    let change = "";
    let cls = "";
    if (baseline) {
      const was = before.get(r.item);
      if (was === undefined) { change = "new"; cls = "new"; }
      else if (was > r.rank) { change = `↑${was - r.rank}`; cls = "up"; }
      else if (was < r.rank) { change = `↓${r.rank - was}`; cls = "down"; }
    }
    body.append(el("tr", { "data-item": r.item },
      el("td", { class: "num" }, r.rank),
      el("td", {}, el("span", { title: r.item }, r.title || r.item)),
      el("td", { class: "num" }, r.score.toFixed(3)),
      el("td", {}, r.head ? `${r.head}${r.heads_fused > 1 ? ` (of ${r.heads_fused})` : ""}` : "—"),
      el("td", {}, chips(r.groups)),
      el("td", { class: cls }, change)));
  }
  if (baseline) {
    const now = new Set(answer.items.map((r) => r.item));
    const gone = baseline.items.filter((r) => !now.has(r.item)).map((r) => r.title || r.item);
    if (gone.length) body.append(el("tr", {}, el("td", { colspan: 6, class: "muted" }, `left the list: ${gone.join("; ")}`)));
  }
}

function renderBars(box, shares, before) {
  box.replaceChildren();
  const names = (state.health.priors[state.prior] || []).filter((g) => g in shares);
  for (const g of names) {
    const v = shares[g] || 0;
    const track = el("div", { class: "track" },
      el("div", { class: "fill", style: `width:${(100 * v).toFixed(1)}%;background:${colour(state.prior, g)}` }));
    if (before) track.append(el("div", { class: "base", style: `left:${(100 * (before[g] || 0)).toFixed(1)}%`,
                                         title: `before: ${(100 * (before[g] || 0)).toFixed(0)}%` }));
    box.append(el("div", { class: "row", "data-group": g, "data-share": v.toFixed(4) },
      el("span", { class: "name", title: g }, g), track, el("span", { class: "val" }, `${(100 * v).toFixed(0)}%`)));
  }
}

function renderHistory(answer) {
  // the model's p(group | history) as bars; the marks: the history's own mix of the groups
  renderBars($("#profile"), (answer.profile || answer.history_mix || {})[state.prior] || {},
             answer.profile ? (answer.history_mix || {})[state.prior] : null);
  const list = $("#history-list");
  list.replaceChildren();
  const items = (answer.history || []).slice().reverse();  // latest first
  for (const h of items) list.append(el("li", {}, el("span", { title: h.item }, h.title || h.item), " ", chips(h.groups)));
  list.setAttribute("start", String(answer.history_length || items.length));
  $("#history-note").textContent = answer.history_length ? `${answer.history_length} items, latest first` : "";
}

function schedule(withBaseline) {
  clearTimeout(state.timer);
  state.timer = setTimeout(() => refresh(withBaseline), 120);
}

function fillGroups() {
  const select = $("#steer-group");
  select.replaceChildren();
  for (const g of state.health.priors[state.prior] || []) select.append(el("option", { value: g }, g));
}

async function start() {
  try {
    state.health = await api("/health");
  } catch (e) {
    showError(e.message);
    return;
  }
  const h = state.health;
  $("#run-info").textContent = `run ${h.run} · dataset ${h.dataset} · ${h.items} items · ${h.users} users · heads: ${h.heads.join(", ")}`;
  $("#k").max = h.items;
  const priors = Object.keys(h.priors);
  for (const p of priors) $("#prior").append(el("option", { value: p }, p));
  state.prior = priors[0] || null;
  $("#steer-panel").hidden = !h.objectives || !state.prior;
  if (state.prior) fillGroups();
  const users = await api("/users?limit=1000");
  for (const u of users.users) $("#user-list").append(el("option", { value: u }));
  $("#user").value = users.users[0] || "";
  $("#go").addEventListener("click", () => refresh(true));
  $("#user").addEventListener("change", () => { $("#history").value = ""; refresh(true); });
  $("#k").addEventListener("change", () => refresh(true));
  $("#prior").addEventListener("change", () => { state.prior = $("#prior").value; fillGroups(); refresh(false); });
  for (const [input, out] of [["#boost", "#boost-out"], ["#quota", "#quota-out"], ["#calibrate-lambda", "#lambda-out"]]) {
    $(input).addEventListener("input", () => { $(out).textContent = $(input).value; schedule(false); });
  }
  for (const id of ["#calibrate", "#steer-group"]) $(id).addEventListener("change", () => schedule(false));
  $("#reset").addEventListener("click", () => {
    $("#boost").value = 0; $("#quota").value = 0; $("#calibrate").checked = false;
    $("#boost-out").textContent = "0"; $("#quota-out").textContent = "0";
    refresh(false);
  });
  await refresh(true);
}

start();
