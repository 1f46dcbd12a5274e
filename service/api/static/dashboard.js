// The dashboard: reads the JSON API of this server only (same origin) and draws with chart.js.
"use strict";

const keyInput = document.getElementById("api-key");
const FINISHED = ["succeeded", "failed", "cancelled"];

async function api(method, path, body) {
  const headers = {};
  if (body !== undefined) headers["content-type"] = "application/json";
  if (keyInput.value) headers.authorization = "Bearer " + keyInput.value; // kept in the page only
  const r = await fetch(path, { method, headers, body: body === undefined ? undefined : JSON.stringify(body) });
  const text = await r.text();
  const data = text ? JSON.parse(text) : null;
  if (!r.ok) {
    const detail = data && data.detail;
    throw new Error(typeof detail === "string" ? detail : `${r.status}: ${JSON.stringify(detail)}`);
  }
  return data;
}

function node(tag, textContent, attrs = {}) {
  const n = document.createElement(tag);
  if (textContent !== undefined && textContent !== null) n.textContent = String(textContent);
  for (const [k, v] of Object.entries(attrs)) n.setAttribute(k, v);
  return n;
}

function row(cells) {
  const tr = document.createElement("tr");
  for (const c of cells) {
    const td = document.createElement("td");
    if (c instanceof Node) td.appendChild(c); else td.textContent = c === null || c === undefined ? "–" : String(c);
    tr.appendChild(td);
  }
  return tr;
}

function num(v, digits = 1) {
  return v === null || v === undefined || Number.isNaN(v) ? "–" : Number(v).toFixed(digits);
}

function describeObservation(o) {
  if (!o) return "–";
  if (o.type === "discrete") return `discrete(${o.n})`;
  if (o.type === "dict") return "{" + Object.entries(o.entries).map(([k, v]) => `${k}: ${describeObservation(v)}`).join(", ") + "}";
  return `${o.dtype || "float32"} [${o.shape.join("×")}]`;
}

function describeAction(a) {
  if (!a) return "–";
  return a.type === "discrete" ? `discrete(${a.n})` : `box [${a.shape.join("×")}]`;
}

// -- the index page ----------------------------------------------------------------------------
async function loadPolicies() {
  const { policies } = await api("GET", "/v1/policies");
  policyNames = policies.map((p) => p.name);
  const details = await Promise.all(policies.map((p) => api("GET", `/v1/policies/${encodeURIComponent(p.name)}`)));
  const rows = details.map((p) => {
    const versions = p.version_details
      .map((v) => {
        if (v.error) return `v${v.version}: broken`;
        const prov = v.provenance || (v.spec && v.spec.provenance) || {};
        return `v${v.version}: ${num(prov.eval_mean_return)}`;
      })
      .join(" · ");
    const select = node("select", undefined, { "data-policy": p.name, title: "set the default version (admin)" });
    for (const v of p.versions) {
      const opt = node("option", `v${v}`, { value: String(v) });
      if (v === p.default_version) opt.selected = true;
      select.appendChild(opt);
    }
    select.addEventListener("change", async () => {
      try {
        await api("PUT", `/v1/policies/${encodeURIComponent(p.name)}/default`, { version: Number(select.value) });
      } catch (e) {
        alert(e.message);
      }
      loadPolicies();
    });
    const kind = p.kind + (p.recurrent ? " · LSTM" : "");
    return row([node("strong", p.name), kind, describeObservation(p.observation), describeAction(p.action), p.env_id, versions, select]);
  });
  document.querySelector("#policies tbody").replaceChildren(...rows);
}

// -- versions side by side: what each earned with real clients (GET …/stats) ---------------------
let policyNames = [];

function intervalBar(ret, lo, hi) {
  // the interval as a line, the mean as a dot, on a scale shared by the policy's versions
  const svg = document.createElementNS("http://www.w3.org/2000/svg", "svg");
  svg.setAttribute("viewBox", "0 0 160 14");
  svg.setAttribute("class", "interval");
  if (ret.mean === null) return svg;
  const span = hi - lo || 1;
  const x = (v) => 4 + ((v - lo) / span) * 152;
  const [a, b] = ret.ci95 || [ret.mean, ret.mean];
  el("line", { x1: x(a), y1: 7, x2: x(b), y2: 7, stroke: "#1a56c4", "stroke-width": 2 }, svg);
  el("circle", { cx: x(ret.mean), cy: 7, r: 3, fill: "#1a56c4" }, svg);
  return svg;
}

async function loadVersionStats() {
  const all = await Promise.all(policyNames.map((n) => api("GET", `/v1/policies/${encodeURIComponent(n)}/stats`)));
  const rows = [];
  for (const s of all) {
    const shown = s.versions.filter((v) => v.requests || v.sessions || v.episodes || (s.routing && s.routing[v.version]));
    const ends = shown.flatMap((v) => (v.return.ci95 ? v.return.ci95 : v.return.mean === null ? [] : [v.return.mean]));
    const [lo, hi] = [Math.min(...ends), Math.max(...ends)];
    for (const v of shown) {
      const r = v.return;
      const text = r.mean === null ? "–" : `${num(r.mean)}` + (r.ci95 ? ` [${num(r.ci95[0])}, ${num(r.ci95[1])}]` : "");
      const share = s.routing ? (s.routing[v.version] !== undefined ? `${num(100 * s.routing[v.version], 0)}%` : "0%") : "default";
      rows.push(row([node("strong", s.policy), `v${v.version}`, share, v.requests, v.sessions, v.episodes, text, intervalBar(r, lo, hi)]));
    }
    if (s.shadow) {
      const sh = s.shadow;
      const agreement = sh.agreement === null ? "–" : `${num(100 * sh.agreement, 1)}% agree`;
      rows.push(row([node("strong", s.policy), `v${sh.version}`, "shadow", sh.compared, "", "", `${agreement} · ${sh.dropped} dropped`, ""]));
    }
  }
  document.querySelector("#version-stats tbody").replaceChildren(...rows);
}

async function loadJobs() {
  const { jobs } = await api("GET", "/v1/jobs");
  const shown = jobs.slice(0, 30);
  const curves = await Promise.all(
    shown.map((j, i) => (i < 10 ? api("GET", `/v1/jobs/${j.job_id}/metrics`).then((m) => m.points) : Promise.resolve([]))),
  );
  const rows = shown.map((j, i) => {
    const p = j.progress || {};
    const spark = document.createElementNS("http://www.w3.org/2000/svg", "svg");
    spark.setAttribute("viewBox", "0 0 120 28");
    spark.setAttribute("class", "spark");
    lineChart(spark, [{ points: curves[i].filter((q) => q.mean_return !== null).map((q) => [q.frames, q.mean_return]), color: "#1a56c4" }], { axes: false });
    const link = node("a", j.job_id.slice(0, 8), { href: `/ui/jobs/${j.job_id}` });
    const req = j.request || {};
    return row([
      link,
      node("span", j.status, { class: `status-${j.status}` }),
      `${req.algorithm} / ${req.env_id}`,
      req.policy_name,
      p.frames !== undefined ? `${p.frames} / ${p.total_frames}` : `0 / ${req.total_frames}`,
      num(p.mean_return),
      spark,
    ]);
  });
  document.querySelector("#jobs tbody").replaceChildren(...rows);
}

async function loadSessions() {
  const s = await api("GET", "/v1/sessions");
  document.getElementById("sessions").textContent = `${s.live} live session(s) (limit ${s.limit})`;
}

async function loadEnvs() {
  const { envs } = await api("GET", "/v1/envs");
  const select = document.getElementById("env-select");
  select.replaceChildren(...envs.map((e) => node("option", e.env_id, { value: e.env_id, title: e.description })));
}

function setUpJobForm() {
  const form = document.getElementById("new-job");
  const message = document.getElementById("form-message");
  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    const data = new FormData(form);
    const body = {
      algorithm: data.get("algorithm"),
      env_id: data.get("env_id"),
      policy_name: data.get("policy_name"),
      total_frames: Number(data.get("total_frames")),
      recurrent: data.get("recurrent") === "on",
    };
    try {
      const job = await api("POST", "/v1/jobs", body);
      message.textContent = "";
      window.location.href = `/ui/jobs/${job.job_id}`;
    } catch (e) {
      message.textContent = e.message;
    }
  });
}

async function indexPage() {
  setUpJobForm();
  const refresh = async () => {
    try {
      await Promise.all([loadJobs(), loadSessions(), loadVersionStats()]);
    } catch (e) {
      console.warn("refresh failed", e);
    }
  };
  await Promise.all([loadPolicies(), loadEnvs()]);
  await refresh();
  setInterval(refresh, 2000);
  setInterval(loadPolicies, 15000);
}

// -- the job page ------------------------------------------------------------------------------
async function jobPage() {
  const jobId = decodeURIComponent(window.location.pathname.split("/").pop());
  document.getElementById("job-id").textContent = jobId;
  const message = document.getElementById("message");
  document.getElementById("cancel").addEventListener("click", async () => {
    try {
      await api("POST", `/v1/jobs/${encodeURIComponent(jobId)}/cancel`);
      message.textContent = "cancel requested";
    } catch (e) {
      message.textContent = e.message;
    }
    update();
  });
  let timer = null;
  async function update() {
    let job, points;
    try {
      [job, { points }] = await Promise.all([
        api("GET", `/v1/jobs/${encodeURIComponent(jobId)}`),
        api("GET", `/v1/jobs/${encodeURIComponent(jobId)}/metrics`),
      ]);
    } catch (e) {
      message.textContent = e.message;
      clearInterval(timer);
      return;
    }
    const status = document.getElementById("status");
    status.textContent = job.status;
    status.className = `status-${job.status}`;
    document.getElementById("cancel").disabled = FINISHED.includes(job.status);
    const p = job.progress || {};
    const fields = [
      ["frames", p.frames !== undefined ? `${p.frames} / ${p.total_frames}` : "–"],
      ["episodes", p.episodes],
      ["mean return", num(p.mean_return, 2)],
      ["loss", num(p.loss, 4)],
      ["epsilon", num(p.epsilon, 3)],
      ["frames/s", num(p.fps, 0)],
      ["device", job.device],
      ["created", job.created_at],
      ["error", job.error],
    ];
    document.getElementById("progress").replaceChildren(...fields.flatMap(([k, v]) => [node("dt", k), node("dd", v === null || v === undefined ? "–" : v)]));
    const series = (key) => points.filter((q) => q[key] !== null && q[key] !== undefined).map((q) => [q.frames, q[key]]);
    lineChart(document.getElementById("chart-return"), [
      { points: series("mean_return"), color: "#1a56c4" },
      { points: series("eval_mean_return"), color: "#d9480f", dots: true },
    ]);
    lineChart(document.getElementById("chart-loss"), [{ points: series("loss"), color: "#5f3dc4" }]);
    lineChart(document.getElementById("chart-epsilon"), [{ points: series("epsilon"), color: "#0a7d32" }]);
    lineChart(document.getElementById("chart-fps"), [{ points: series("fps"), color: "#8a6d00" }]);
    document.getElementById("request").textContent = JSON.stringify(job.request, null, 1);
    document.getElementById("result").textContent = job.result ? JSON.stringify(job.result, null, 1) : "–";
    if (FINISHED.includes(job.status)) clearInterval(timer);
  }
  await update();
  timer = setInterval(update, 1000);
}

if (document.body.dataset.page === "job") jobPage(); else indexPage();
