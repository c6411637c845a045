// The REST API from the browser: the key (kept in sessionStorage: this tab, until it closes),
// requests that turn problems (RFC 9457) into errors, the event stream, uploads with progress and
// downloads. Every call goes to the API that served this page.

const KEY = "erq-api-key";
export const API = new URL("../", location.href); // the console is served at API/ui/

export const apiKey = {
  get: () => sessionStorage.getItem(KEY),
  set: (value) => sessionStorage.setItem(KEY, value.trim()),
  forget: () => sessionStorage.removeItem(KEY),
};

export class ApiError extends Error {
  constructor(status, problem) {
    super(problem.detail || `HTTP ${status}`);
    this.status = status;
    this.code = problem.code || null;
    this.field = problem.field || null;
  }
}

function auth(headers = {}) {
  return { Authorization: `Bearer ${apiKey.get()}`, ...headers };
}

async function problemOf(answer) {
  let problem = {};
  try {
    problem = await answer.json();
  } catch {
    problem = {};
  }
  return new ApiError(answer.status, problem);
}

export function url(path, query) {
  const target = new URL(path, API);
  for (const [name, value] of query || []) target.searchParams.append(name, value);
  return target;
}

// GET/POST/DELETE a path under the API; JSON in and out (null for 204).
export async function api(path, { method = "GET", body, query } = {}) {
  const headers = auth(body === undefined ? {} : { "Content-Type": "application/json" });
  const answer = await fetch(url(path, query), {
    method, headers, body: body === undefined ? undefined : JSON.stringify(body),
  });
  if (!answer.ok) throw await problemOf(answer);
  return answer.status === 204 ? null : answer.json();
}

// A file of the API (an artifact) as a Blob, with the key.
export async function fetchBlob(href) {
  const answer = await fetch(href, { headers: auth() });
  if (!answer.ok) throw await problemOf(answer);
  return answer.blob();
}

export async function download(href, name) {
  const blob = await fetchBlob(href);
  const link = document.createElement("a");
  link.href = URL.createObjectURL(blob);
  link.download = name;
  document.body.append(link);
  link.click();
  link.remove();
  setTimeout(() => URL.revokeObjectURL(link.href), 60_000);
}

const TERMINAL = ["succeeded", "failed", "cancelled"];

function parseEvent(block) {
  const event = { id: null, kind: "message", data: null };
  const data = [];
  for (const line of block.split("\n")) {
    if (!line || line.startsWith(":")) continue;
    const at = line.indexOf(":");
    const name = at < 0 ? line : line.slice(0, at);
    const value = at < 0 ? "" : line.slice(at + 1).replace(/^ /, "");
    if (name === "id") event.id = value;
    else if (name === "event") event.kind = value;
    else if (name === "data") data.push(value);
  }
  if (!data.length) return null;
  event.data = JSON.parse(data.join("\n"));
  return event;
}

// Follow a job's Server-Sent Events (fetch, not EventSource: EventSource cannot send the key);
// a dropped stream is resumed with Last-Event-ID. Ends after the terminal status or when `signal` aborts.
export async function follow(jobId, onEvent, signal) {
  let lastId = null;
  for (let failures = 0; failures < 20 && !signal.aborted; failures++) {
    try {
      const headers = auth(lastId ? { "Last-Event-ID": lastId } : {});
      const answer = await fetch(url(`v1/jobs/${jobId}/events`), { headers, signal });
      if (!answer.ok) throw await problemOf(answer);
      const reader = answer.body.pipeThrough(new TextDecoderStream()).getReader();
      let buffer = "";
      for (;;) {
        const { value, done } = await reader.read();
        if (done) break;
        buffer += value.replace(/\r\n/g, "\n");
        let end;
        while ((end = buffer.indexOf("\n\n")) >= 0) {
          const event = parseEvent(buffer.slice(0, end));
          buffer = buffer.slice(end + 2);
          if (!event) continue;
          lastId = event.id || lastId;
          failures = 0;
          onEvent(event);
          if (event.kind === "status" && TERMINAL.includes(event.data.status)) return;
          if (event.kind === "closed") return;
        }
      }
    } catch (error) {
      if (signal.aborted) return;
      if (error instanceof ApiError) throw error;
    }
    await new Promise((resolve) => setTimeout(resolve, Math.min(5000, 500 * (failures + 1))));
  }
}

const ARCHIVE_TYPES = [[".zip", "application/zip"], [".tar.gz", "application/gzip"], [".tgz", "application/gzip"],
  [".tar", "application/x-tar"]];

function archiveType(name) {
  const found = ARCHIVE_TYPES.find(([suffix]) => name.toLowerCase().endsWith(suffix));
  return found ? found[1] : "application/octet-stream";
}

// POST files to an upload route with progress (XMLHttpRequest: fetch reports no upload progress).
// One file goes as the raw body; a model's config.json and .safetensors go as the form parts config and weights.
export function upload(path, files, onProgress) {
  return new Promise((resolve, reject) => {
    const request = new XMLHttpRequest();
    request.open("POST", url(path));
    request.setRequestHeader("Authorization", `Bearer ${apiKey.get()}`);
    let body;
    if (files.length === 1) {
      body = files[0];
      request.setRequestHeader("Content-Type", archiveType(files[0].name));
      request.setRequestHeader("X-Filename", files[0].name.replace(/[^\x20-\x7e]/g, "_"));
    } else {
      body = new FormData();
      for (const file of files) body.append(file.name.endsWith(".json") ? "config" : "weights", file, file.name);
    }
    request.upload.onprogress = (event) => onProgress(event.loaded, event.total || 0);
    request.onload = () => {
      let answer = {};
      try {
        answer = JSON.parse(request.responseText);
      } catch {
        answer = {};
      }
      if (request.status >= 200 && request.status < 300) resolve(answer);
      else reject(new ApiError(request.status, answer));
    };
    request.onerror = () => reject(new ApiError(0, { detail: "the upload broke off: check the connection and send it again" }));
    request.send(body);
  });
}

export { TERMINAL };
