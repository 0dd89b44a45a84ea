"use strict";
// Built with DOM nodes and textContent only: series descriptions come from DICOM headers.
const HEADERS = {"X-Dicomnode-Console": "1"};

function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (k === "onclick") node.addEventListener("click", v); else node.setAttribute(k, v);
  }
  for (const c of children) node.append(c instanceof Node ? c : document.createTextNode(c ?? ""));
  return node;
}
function when(ts) { return ts ? new Date(ts * 1000).toLocaleString() : "-"; }
function secs(s) { return s === null || s === undefined ? "-" : Number(s).toFixed(1) + " s"; }

async function api(method, path, body) {
  const init = {method, headers: {...HEADERS}, credentials: "same-origin"};
  if (body !== undefined) {
    init.headers["Content-Type"] = "application/json";
    init.body = JSON.stringify(body);
  }
  const response = await fetch(path, init);
  if (response.status === 401) { location.reload(); throw new Error("signed out"); }
  const data = response.headers.get("content-type")?.includes("json") ? await response.json() : null;
  if (!response.ok) {
    const detail = data && data.detail;
    const text = d => typeof d === "string" ? d : JSON.stringify(d);
    throw new Error(Array.isArray(detail) ? detail.map(text).join("\n") : (detail || response.statusText));
  }
  return data;
}
function fill(tableId, rows) {
  const body = document.querySelector(`#${tableId} tbody`);
  // A periodic refresh that changes nothing leaves the rows alone: replacing them would swallow a
  // click (a Replay button pressed as its row is swapped) or a text selection made during it.
  if (body.innerHTML === rows.map(r => r.outerHTML).join("")) return;
  body.replaceChildren(...rows);
}

async function loadOverview() {
  const o = await api("GET", "/api/overview");
  document.getElementById("ae-title").textContent = o.ae_title;
  document.getElementById("ov-rate").textContent = o.images_per_second.toFixed(2);
  document.getElementById("ov-instances").textContent = o.instances;
  document.getElementById("ov-queue").textContent = o.queue_depth;
  document.getElementById("ov-dead").textContent = o.dead_letters;
  document.getElementById("ov-failed").textContent = o.failed_analyses;
  const t = o.time_to_result;
  document.getElementById("ov-ttr").textContent = t.count ? `${secs(t.median_s)} / ${secs(t.p90_s)}` : "-";
  fill("ov-jobs", Object.entries(o.jobs).map(([kind, s]) =>
    el("tr", {}, el("td", {}, kind), el("td", {}, s.queued), el("td", {}, s.running), el("td", {}, s.failed),
       el("td", {}, s.succeeded), el("td", {}, s.dead))));
}

function resetPeerForm() {
  document.getElementById("peer-form").reset();
  document.getElementById("peer-original").value = "";
  document.getElementById("peer-form-title").textContent = "Add a peer";
  document.getElementById("peer-save").textContent = "Add";
  document.getElementById("peer-cancel").hidden = true;
}
function editPeer(p) {
  document.getElementById("peer-original").value = p.ae_title;
  document.getElementById("peer-ae").value = p.ae_title;
  document.getElementById("peer-hosts").value = p.hosts.join(", ");
  document.getElementById("peer-description").value = p.description;
  document.getElementById("peer-form-title").textContent = `Edit ${p.ae_title}`;
  document.getElementById("peer-save").textContent = "Save";
  document.getElementById("peer-cancel").hidden = false;
}
async function removePeer(ae) {
  if (!confirm(`Remove peer ${ae}? Its next association will be rejected.`)) return;
  await peerChange(() => api("DELETE", `/api/peers/${encodeURIComponent(ae)}`), `Removed ${ae}.`);
}
async function peerChange(action, message) {
  const error = document.getElementById("peer-error");
  const done = document.getElementById("peer-message");
  error.textContent = ""; done.textContent = "";
  try { await action(); done.textContent = message; resetPeerForm(); await loadPeers(); }
  catch (e) { error.textContent = e.message; }
}
async function loadPeers() {
  const data = await api("GET", "/api/peers");
  document.getElementById("peers-file").textContent = data.editable
    ? `Saved to ${data.config_path} and applied at once.`
    : `Read only: ${data.read_only_reason}.`;
  fill("peers-table", data.peers.map(p => el("tr", {"data-ae": p.ae_title},
    el("td", {}, p.ae_title), el("td", {}, p.hosts.join(", ")), el("td", {}, p.description),
    el("td", {},
       el("button", {type: "button", id: `edit-${p.ae_title}`, onclick: () => editPeer(p)}, "Edit"), " ",
       el("button", {type: "button", id: `remove-${p.ae_title}`, onclick: () => removePeer(p.ae_title)},
          "Remove")))));
}
document.getElementById("peer-form").addEventListener("submit", ev => {
  ev.preventDefault();
  const original = document.getElementById("peer-original").value;
  const body = {
    ae_title: document.getElementById("peer-ae").value,
    hosts: document.getElementById("peer-hosts").value.split(",").map(h => h.trim()).filter(h => h),
    description: document.getElementById("peer-description").value,
  };
  peerChange(() => original ? api("PUT", `/api/peers/${encodeURIComponent(original)}`, body)
                            : api("POST", "/api/peers", body),
             original ? `Saved ${body.ae_title}.` : `Added ${body.ae_title}.`);
});
document.getElementById("peer-cancel").addEventListener("click", resetPeerForm);

async function echo(name) {
  const cell = document.getElementById(`echo-result-${name}`);
  cell.textContent = "...";
  try {
    const r = await api("POST", `/api/destinations/${encodeURIComponent(name)}/echo`);
    cell.textContent = r.ok ? `OK ${r.status} in ${secs(r.seconds)}` : `FAILED ${r.status} ${r.error}`;
    cell.className = r.ok ? "ok" : "error";
  } catch (e) { cell.textContent = e.message; cell.className = "error"; }
}
async function loadDestinations() {
  const rows = await api("GET", "/api/destinations");
  fill("destinations-table", rows.map(d => el("tr", {},
    el("td", {}, d.name), el("td", {}, d.ae_title), el("td", {}, d.host), el("td", {}, d.port),
    el("td", {}, d.tls ? "yes" : "no"),
    el("td", {},
       el("button", {type: "button", id: `echo-${d.name}`, onclick: () => echo(d.name)}, "Test (C-ECHO)")),
    el("td", {id: `echo-result-${d.name}`}))));
}

function verdicts(results) {
  const seen = new Map();
  for (const r of results) if (!seen.has(r.analyzer)) seen.set(r.analyzer, r);
  return [...seen.values()].map(r => {
    const found = (r.findings || []).filter(f => f.present).map(f => f.type);
    const text = `${r.analyzer}: ${r.status ?? "?"}` + (r.priority ? ` (${r.priority})` : "")
               + (found.length ? ` - ${found.join(", ")}` : "") + (r.error ? ` - ${r.error}` : "");
    const cls = `verdict ${r.status ?? ""} ${r.priority ?? ""}`;
    return el("span", {class: cls, title: r.sop_instance_uid}, text);
  });
}
function notified(events) {
  // one line per event: its type, then each channel with the time from the last image to its ACK
  return (events || []).map(e => el("div", {class: `event ${e.type.replace(".", "-")}`, title: e.id},
    `${e.type}: ` + e.notifications.map(n => `${n.channel} ` + (n.time_to_notification_s !== null
      ? secs(n.time_to_notification_s) : n.state)).join(", ")));
}
async function loadSeries() {
  const [series, jobs] = await Promise.all([api("GET", "/api/series?limit=25"),
                                            api("GET", "/api/jobs?limit=50")]);
  fill("series-table", series.map(s => el("tr", {title: s.series_instance_uid},
    el("td", {}, when(s.last_received_at)), el("td", {}, s.calling_ae), el("td", {}, s.modality),
    el("td", {}, s.series_description), el("td", {}, s.instances),
    el("td", {}, `${s.state} (epoch ${s.epoch})`),
    el("td", {}, ...verdicts(s.results)), el("td", {}, secs(s.time_to_result_s)),
    el("td", {class: "notified"}, ...notified(s.events)))));
  fill("jobs-table", jobs.map(j => el("tr", {},
    el("td", {}, j.id), el("td", {}, j.kind), el("td", {}, j.state), el("td", {}, j.priority),
    el("td", {}, `${j.attempts}/${j.max_attempts}`), el("td", {}, secs(j.seconds)),
    el("td", {}, j.destination ?? j.channel ?? ""), el("td", {}, j.last_error))));
}

async function replay(id) {
  const message = document.getElementById("dead-message");
  try {
    await api("POST", `/api/jobs/${id}/retry`);
    message.className = "ok";
    message.textContent = `Job ${id} requeued.`;
  }
  catch (e) { message.className = "error"; message.textContent = e.message; }
  await loadDead();
}
async function loadDead() {
  const rows = await api("GET", "/api/dead-letters");
  fill("dead-table", rows.map(j => el("tr", {},
    el("td", {}, j.id), el("td", {}, j.destination ?? j.channel ?? ""),
    el("td", {}, j.kind === "notify" ? (j.event ? `${j.event.type} ${j.event.analyzer}` : "(missing)")
                 : (j.result ? `${j.result.kind} ${j.result.analyzer}` : "(missing)")),
    el("td", {}, j.attempts), el("td", {}, j.last_error),
    el("td", {},
       el("button", {type: "button", id: `replay-${j.id}`, onclick: () => replay(j.id)}, "Replay")))));
}

const PAGES = {overview: loadOverview, peers: loadPeers, destinations: loadDestinations, series: loadSeries,
               dead: loadDead};
function show() {
  const page = (location.hash || "#overview").slice(1);
  const name = PAGES[page] ? page : "overview";
  for (const s of document.querySelectorAll("main section")) s.classList.toggle("active", s.id === name);
  for (const a of document.querySelectorAll("header nav a")) {
    a.classList.toggle("active", a.id === `nav-${name}`);
  }
  PAGES[name]().catch(e => console.error(e));
  return name;
}
window.addEventListener("hashchange", show);
show();
loadOverview().catch(() => {});
setInterval(() => {
  const page = (location.hash || "#overview").slice(1);
  if (page === "overview" || page === "series" || page === "dead") PAGES[page]().catch(() => {});
}, 5000);
