// The erq console: a key for this browser session, the owner's jobs (with the API's filters and
// paging), a job's live progress and log, its report and downloads, a submit form generated from the
// job schema, uploads. Plain modules served by the API: no build step, nothing from elsewhere.

import { ApiError, TERMINAL, api, apiKey, download, fetchBlob, follow, upload } from "./api.js";
import { announce, bytes, h, replace, when } from "./dom.js";
import { fieldsOf, jobSchema } from "./form.js";

const main = document.getElementById("main");
const STATUSES = ["queued", "running", "succeeded", "failed", "cancelled"];
const ARCHIVES = ".zip,.tar,.tar.gz,.tgz";
let leaving = new AbortController(); // aborted when the view changes: stops its event stream

function show(title, ...content) {
  document.title = `${title} · erq console`;
  replace(main, h("h1", {}, title), ...content);
  main.focus({ preventScroll: true });
}

function problem(error) {
  const text = error instanceof ApiError ? `${error.message}${error.code ? ` [${error.code}]` : ""}` : String(error);
  return h("p", { class: "error", role: "alert" }, text);
}

async function guarded(place, work) {
  try {
    return await work();
  } catch (error) {
    if (error instanceof ApiError && error.status === 401) {
      apiKey.forget();
      route();
      return undefined;
    }
    place.replaceChildren(problem(error));
    return undefined;
  }
}

// The key.
function keyView(message) {
  const input = h("input", { id: "api-key", name: "api-key", type: "password", autocomplete: "off", required: true,
    "aria-describedby": "api-key-help", spellcheck: "false" });
  const status = h("div", { "aria-live": "polite" }, message ? problem(message) : null);
  const form = h("form", { class: "card", onsubmit: async (event) => {
    event.preventDefault();
    apiKey.set(input.value);
    try {
      await api("v1/jobs", { query: [["limit", "1"]] });
      location.hash = "#/jobs";
      route();
    } catch (error) {
      apiKey.forget();
      replace(status, problem(error));
      input.focus();
    }
  } },
  h("label", { for: "api-key" }, "API key"), input,
  h("small", { id: "api-key-help", class: "hint" },
    "Kept in this browser tab only (sessionStorage) and sent to this service alone; it is forgotten when the tab "
    + "closes. An administrator makes one with erq admin create-key OWNER."),
  h("button", { type: "submit" }, "Use this key"), status);
  show("Sign in with an API key", form);
  input.focus();
}

// The job list.
function jobQuery(params) {
  const query = [["limit", params.get("limit") || "20"]];
  for (const status of params.getAll("status")) query.push(["status", status]);
  for (const name of ["model", "created_after", "created_before", "cursor"]) {
    if (params.get(name)) query.push([name, params.get(name)]);
  }
  for (const pair of params.getAll("metadata")) {
    const [key, ...value] = pair.split("=");
    if (key) query.push([`metadata[${key}]`, value.join("=")]);
  }
  return query;
}

function shortModel(model) {
  if (model.startsWith("local-dir:")) return model.split("/").filter(Boolean).pop();
  if (model.startsWith("upload:")) return `upload:${model.slice(7, 15)}…`;
  return model;
}

function top1(metrics, which) {
  const value = metrics && metrics[which] && metrics[which].top1;
  return typeof value === "number" ? value.toFixed(1) : "–";
}

function cell(label, ...content) {
  return h("td", { "data-label": label }, ...content);
}

async function jobsView(params) {
  const filters = h("form", { class: "filters", "aria-label": "Filters", onsubmit: (event) => {
    event.preventDefault();
    const data = new FormData(event.target);
    const next = new URLSearchParams();
    for (const status of data.getAll("status")) next.append("status", status);
    for (const name of ["model", "metadata"]) if (data.get(name)) next.append(name, data.get(name));
    for (const name of ["created_after", "created_before"]) {
      if (data.get(name)) next.append(name, new Date(data.get(name)).toISOString());
    }
    location.hash = `#/jobs?${next}`;
  } },
  h("fieldset", { class: "choices" }, h("legend", {}, "Status"),
    STATUSES.map((status) => h("label", {}, h("input", { type: "checkbox", name: "status", value: status,
      checked: params.getAll("status").includes(status) }), ` ${status}`))),
  h("div", { class: "field" }, h("label", { for: "filter-model" }, "Model (as stored)"),
    h("input", { id: "filter-model", name: "model", value: params.get("model") || "" })),
  h("div", { class: "field" }, h("label", { for: "filter-metadata" }, "Label (KEY=VALUE)"),
    h("input", { id: "filter-metadata", name: "metadata", value: params.get("metadata") || "" })),
  h("div", { class: "field" }, h("label", { for: "filter-after" }, "Created after"),
    h("input", { id: "filter-after", name: "created_after", type: "datetime-local" })),
  h("div", { class: "field" }, h("label", { for: "filter-before" }, "Created before"),
    h("input", { id: "filter-before", name: "created_before", type: "datetime-local" })),
  h("button", { type: "submit" }, "Apply filters"));
  const results = h("div", { "aria-live": "polite" }, h("p", {}, "Loading…"));
  show("Jobs", filters, results);
  await guarded(results, async () => {
    const page = await api("v1/jobs", { query: jobQuery(params) });
    const rows = page.jobs.map((job) => h("tr", {},
      cell("Job", h("a", { href: `#/jobs/${job.id}` }, job.id.slice(0, 10))),
      cell("Status", h("span", { class: `status ${job.status}` }, job.status)),
      cell("Model", shortModel(job.params.model)),
      cell("Bits", `W${job.params.w_bits}/A${job.params.a_bits}`),
      cell("Method", job.params.method),
      cell("Top-1 FP / quantized", `${top1(job.metrics, "fp")} / ${top1(job.metrics, "quantized")}`),
      cell("Created", when(job.created_at))));
    const table = page.jobs.length ? h("table", { class: "jobs" },
      h("caption", { class: "visually-hidden" }, "Your jobs, newest first"),
      h("thead", {}, h("tr", {}, ["Job", "Status", "Model", "Bits", "Method", "Top-1 FP / quantized", "Created"]
        .map((title) => h("th", { scope: "col" }, title)))),
      h("tbody", {}, rows)) : h("p", {}, "No jobs match. ", h("a", { href: "#/new" }, "Submit one."));
    const paging = h("nav", { class: "paging", "aria-label": "Pages" });
    if (params.get("cursor")) {
      const first = new URLSearchParams(params);
      first.delete("cursor");
      paging.append(h("a", { href: `#/jobs?${first}` }, "First page"));
    }
    if (page.has_more) {
      const next = new URLSearchParams(params);
      next.set("cursor", page.next_cursor);
      paging.append(h("a", { href: `#/jobs?${next}`, rel: "next" }, "Next page"));
    }
    replace(results, table, paging);
  });
}

// One job, live.
function metricsTable(metrics) {
  const rows = ["fp", "quantized", "quantized_float64"].filter((name) => metrics && metrics[name])
    .map((name) => h("tr", {}, h("th", { scope: "row" }, name),
      h("td", {}, top1(metrics, name)), h("td", {}, metrics[name].top5 !== undefined ? metrics[name].top5.toFixed(1) : "–")));
  return rows.length ? h("table", { class: "metrics" }, h("caption", {}, "Accuracy"),
    h("thead", {}, h("tr", {}, h("th", { scope: "col" }, "model"), h("th", { scope: "col" }, "top-1"),
      h("th", { scope: "col" }, "top-5"))), h("tbody", {}, rows)) : null;
}

async function jobView(jobId) {
  const signal = leaving.signal;
  const state = h("p", { class: "state" });
  const progress = h("progress", { id: "job-progress", max: "1", value: "0" });
  const stage = h("span", { id: "job-stage" });
  const log = h("pre", { id: "job-log", class: "log", role: "log", tabindex: "0", "aria-label": "Job log" });
  const cancel = h("button", { type: "button", id: "cancel-job" }, "Cancel job");
  const remove = h("button", { type: "button", id: "delete-job", class: "danger" }, "Delete job");
  const outcome = h("section", { id: "outcome", "aria-label": "Result" });
  const errors = h("div", { "aria-live": "assertive" });
  show(`Job ${jobId.slice(0, 10)}`, state,
    h("div", { class: "progress" }, h("label", { for: "job-progress" }, "Progress "), progress, " ", stage),
    h("div", { class: "actions" }, cancel, remove), errors, outcome,
    h("h2", {}, "Log"), log);
  const render = (job) => {
    replace(state, "Status: ", h("strong", { id: "job-status", class: `status ${job.status}` }, job.status),
      job.error ? ` — ${job.error}` : "", job.error_code ? ` [${job.error_code}]` : "");
    progress.value = job.progress;
    stage.textContent = `${Math.round(100 * job.progress)}% ${job.stage || ""}`;
    cancel.disabled = TERMINAL.includes(job.status);
    remove.disabled = !TERMINAL.includes(job.status);
  };
  cancel.addEventListener("click", () => guarded(errors, async () => {
    render(await api(`v1/jobs/${jobId}/cancel`, { method: "POST" }));
    announce("Cancel requested");
  }));
  remove.addEventListener("click", () => guarded(errors, async () => {
    if (!window.confirm(`Delete job ${jobId} and its files?`)) return;
    await api(`v1/jobs/${jobId}`, { method: "DELETE" });
    announce("Job deleted");
    location.hash = "#/jobs";
  }));
  const job = await guarded(errors, () => api(`v1/jobs/${jobId}`));
  if (!job) return;
  render(job);
  replace(outcome, paramsList(job.params));
  const ended = async () => {
    const done = await api(`v1/jobs/${jobId}`);
    render(done);
    await showOutcome(done, outcome);
    announce(`Job ${done.status}`);
  };
  await guarded(errors, async () => {
    await follow(jobId, (event) => {
      if (event.kind === "log") log.append(`${event.data.line}\n`);
      else if (event.kind === "progress" || event.kind === "status") {
        render({ ...job, ...event.data, status: event.data.status || job.status });
        if (event.kind === "status") job.status = event.data.status;
      }
    }, signal);
    if (!signal.aborted) await ended();
  });
}

function paramsList(params) {
  return h("details", {}, h("summary", {}, "Parameters"),
    h("dl", { class: "params" }, Object.entries(params).flatMap(([name, value]) => [
      h("dt", {}, name), h("dd", {}, value === null ? "–" : JSON.stringify(value))])));
}

async function showOutcome(job, outcome) {
  const artifacts = job.artifacts.map((artifact) => h("li", {},
    h("button", { type: "button", class: "link", "data-artifact": artifact.name, onclick: (event) =>
      guarded(outcome, () => download(artifact.url, artifact.name).then(() => announce(`${artifact.name} downloaded`))) },
    `Download ${artifact.name}`), ` ${bytes(artifact.size)}`));
  replace(outcome, metricsTable(job.metrics), paramsList(job.params),
    artifacts.length ? h("h2", {}, "Files") : null, artifacts.length ? h("ul", { class: "artifacts" }, artifacts) : null);
  const report = job.artifacts.find((artifact) => artifact.name === "report.html");
  if (report) {
    const blob = await fetchBlob(report.url);
    outcome.append(h("h2", {}, "Report"), h("iframe", { id: "report", title: "Quantization report", sandbox: "",
      src: URL.createObjectURL(new Blob([blob], { type: "text/html" })) }));
  }
}

// Uploads.
function uploadBox({ id, label, route, accept, multiple, hint, onDone }) {
  const input = h("input", { id, type: "file", accept, multiple, "aria-describedby": `${id}-status` });
  const bar = h("progress", { max: "1", value: "0", hidden: true, "aria-label": `${label}: upload progress` });
  const status = h("output", { id: `${id}-status`, for: id, "aria-live": "polite" }, hint || "");
  input.addEventListener("change", async () => {
    if (!input.files.length) return;
    bar.hidden = false;
    bar.value = 0;
    status.textContent = "Uploading…";
    try {
      const uploaded = await upload(route, [...input.files], (sent, total) => {
        bar.value = total ? sent / total : 0;
        status.textContent = `Uploading… ${Math.round(100 * bar.value)}% of ${bytes(total)}`;
      });
      bar.value = 1;
      status.textContent = `Uploaded: ${uploaded.spec}`;
      onDone(uploaded);
    } catch (error) {
      status.replaceChildren(problem(error));
    }
  });
  return h("div", { class: "upload" }, h("label", { for: id }, label), input, bar, status);
}

async function choices(route, key) {
  try {
    return (await api(route, { query: [["limit", "100"]] }))[key];
  } catch {
    return [];
  }
}

function describeUpload(item) {
  return item.architecture ? `${item.filename || item.id.slice(0, 8)} (${item.architecture})`
    : `${item.filename || item.id.slice(0, 8)} (${item.train_images} train / ${item.val_images} val)`;
}

async function newJobView() {
  const errors = h("div", { "aria-live": "assertive" });
  show("New job", h("p", {}, "Loading the job schema…"));
  const schema = await guarded(main, jobSchema);
  if (!schema) return;
  const fields = fieldsOf(schema);
  const byName = Object.fromEntries(fields.map((item) => [item.name, item]));
  const [datasets, models] = await Promise.all([choices("v1/datasets", "datasets"), choices("v1/models/uploads", "models")]);
  const picker = (name, items, label) => {
    const select = h("select", { id: `pick-${name}`, onchange: (event) => {
      if (event.target.value) byName[name].input.value = event.target.value;
    } }, h("option", { value: "" }, items.length ? "— choose —" : "— none yet —"), items.map((item) => h("option", { value: item.spec }, describeUpload(item))));
    return h("div", { class: "field" }, h("label", { for: `pick-${name}` }, label), select);
  };
  const extras = {
    dataset: [picker("dataset", datasets, "or one of your datasets"), uploadBox({
      id: "upload-dataset", label: "or upload an ImageFolder archive", route: "v1/datasets", accept: ARCHIVES,
      hint: ".zip, .tar or .tar.gz of train/CLASS/IMAGE (and val/CLASS/IMAGE)",
      onDone: (item) => { byName.dataset.input.value = item.spec; } })],
    model: [picker("model", models, "or one of your uploaded models"), uploadBox({
      id: "upload-model", label: "or upload a timm folder", route: "v1/models", accept: `${ARCHIVES},.json,.safetensors`,
      multiple: true, hint: "config.json and model.safetensors together, or the folder as an archive",
      onDone: (item) => { byName.model.input.value = item.spec; } })],
  };
  const what = fields.filter((item) => item.name === "model" || item.name === "dataset");
  const how = fields.filter((item) => item.name !== "model" && item.name !== "dataset");
  const form = h("form", { id: "job-form", novalidate: true, onsubmit: async (event) => {
    event.preventDefault();
    const body = {};
    for (const item of fields) {
      const [set, value] = item.read();
      if (set) body[item.name] = value;
    }
    await guarded(errors, async () => {
      try {
        const job = await api("v1/jobs", { method: "POST", body });
        location.hash = `#/jobs/${job.id}`;
      } catch (error) {
        if (error instanceof ApiError && error.field && byName[error.field.split(".")[0]]) {
          byName[error.field.split(".")[0]].focus();
        }
        throw error;
      }
    });
  } },
  h("fieldset", {}, h("legend", {}, "What to quantize"),
    what.map((item) => h("div", { class: "group" }, item.element, extras[item.name]))),
  h("fieldset", {}, h("legend", {}, "How"), how.map((item) => item.element)),
  errors, h("button", { type: "submit" }, "Submit job"));
  show("New job", form);
}

async function uploadsView() {
  const errors = h("div", { "aria-live": "assertive" });
  const lists = h("div");
  const refresh = () => guarded(errors, async () => {
    const [datasets, models] = await Promise.all([api("v1/datasets", { query: [["limit", "100"]] }),
      api("v1/models/uploads", { query: [["limit", "100"]] })]);
    const listing = (items, route) => (items.length ? h("ul", { class: "uploads" }, items.map((item) => h("li", {},
      h("code", {}, item.spec), ` ${describeUpload(item)}, ${bytes(item.size)} `,
      h("button", { type: "button", class: "danger", onclick: () => guarded(errors, async () => {
        if (!window.confirm(`Delete ${item.spec}?`)) return;
        await api(`${route}/${item.id}`, { method: "DELETE" });
        announce(`${item.spec} deleted`);
        refresh();
      }), "aria-label": `Delete ${item.spec}` }, "Delete")))) : h("p", {}, "None yet."));
    replace(lists, h("h2", {}, "Datasets"), listing(datasets.datasets, "v1/datasets"),
      h("h2", {}, "Models"), listing(models.models, "v1/models"));
  });
  show("Uploads",
    uploadBox({ id: "upload-dataset", label: "Upload a dataset (ImageFolder archive)", route: "v1/datasets",
      accept: ARCHIVES, onDone: refresh }),
    uploadBox({ id: "upload-model", label: "Upload a model (config.json and model.safetensors, or an archive)",
      route: "v1/models", accept: `${ARCHIVES},.json,.safetensors`, multiple: true, onDone: refresh }),
    errors, lists);
  await refresh();
}

// Routing: #/jobs?filters, #/jobs/ID, #/new, #/uploads.
function route() {
  leaving.abort();
  leaving = new AbortController();
  const signedIn = Boolean(apiKey.get());
  document.getElementById("nav").hidden = !signedIn;
  if (!signedIn) return keyView();
  const [path, query] = (location.hash.slice(1) || "/jobs").split("?");
  const params = new URLSearchParams(query || "");
  for (const link of document.querySelectorAll("#nav a")) {
    if (link.getAttribute("href") === `#${path}`) link.setAttribute("aria-current", "page");
    else link.removeAttribute("aria-current");
  }
  const job = path.match(/^\/jobs\/([A-Za-z0-9]+)$/);
  if (job) return jobView(job[1]);
  if (path === "/new") return newJobView();
  if (path === "/uploads") return uploadsView();
  return jobsView(params);
}

document.getElementById("forget-key").addEventListener("click", () => {
  apiKey.forget();
  location.hash = "";
  route();
});
window.addEventListener("hashchange", route);
route();
