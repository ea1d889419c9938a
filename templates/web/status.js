// dynprov status page: polls GET api/v1/status and fills the tables. Every value goes in as
// text (textContent), never as HTML: node reports and reasons are free text from the nodes.
"use strict";
(function () {
  const body = document.body;
  const poll = Math.max(1, Number(body.dataset.poll || 5)) * 1000;
  const TOKEN_KEY = "dynprov-token";
  const $ = (id) => document.getElementById(id);
  let timer = null;

  function cell(row, text, cls) {
    const td = document.createElement("td");
    td.textContent = text === null || text === undefined || text === "" ? "-" : String(text);
    if (cls) td.className = cls;
    row.appendChild(td);
    return td;
  }
  function stateClass(state) {
    return "state-" + String(state || "unknown").replace(/[^a-z0-9]+/gi, "-").toLowerCase();
  }
  function when(ts) {
    return ts ? new Date(ts * 1000).toLocaleString() : "";
  }
  function fill(id, rows, build) {
    const tbody = $(id).tBodies[0];
    const frag = document.createDocumentFragment();
    for (const item of rows) {
      const tr = document.createElement("tr");
      build(tr, item);
      frag.appendChild(tr);
    }
    tbody.replaceChildren(frag);
  }

  function render(data) {
    $("run-count").textContent = data.runs.length;
    fill("runs", data.runs, (tr, run) => {
      cell(tr, run.id);
      cell(tr, run.label);
      const td = cell(tr, "");
      td.textContent = "";
      const bar = document.createElement("span");
      bar.className = "bar";
      const fillEl = document.createElement("span");
      fillEl.style.width = (run.total ? Math.round(100 * run.done / run.total) : 0) + "%";
      bar.appendChild(fillEl);
      td.appendChild(bar);
      td.appendChild(document.createTextNode(" " + run.done + "/" + run.total));
      cell(tr, Object.entries(run.steps).map(([k, v]) => k + " " + v).join(", "));
      cell(tr, run.nodes.map((n) => n.node).join(" "), "detail");
    });
    $("node-count").textContent = data.nodes.length;
    fill("nodes", data.nodes, (tr, n) => {
      tr.dataset.node = n.name;
      cell(tr, n.name);
      cell(tr, n.os);
      cell(tr, n.state + (n.reason ? " (" + n.reason + ")" : ""), stateClass(n.state) + " detail");
      cell(tr, n.pool);
      const ev = n.last_event;
      cell(tr, ev ? when(ev.ts) + " " + ev.kind + (ev.detail ? ": " + ev.detail : "") : "", "detail");
    });
    $("image-count").textContent = data.images.length;
    fill("images", data.images, (tr, i) => {
      cell(tr, i.label); cell(tr, i.os_name); cell(tr, i.arch); cell(tr, i.mode);
    });
    $("pool-count").textContent = data.pools.length;
    fill("pools", data.pools, (tr, p) => {
      cell(tr, p.name); cell(tr, p.nodes); cell(tr, p.scheduler ? "yes" : "");
    });
    $("updated").textContent = "updated " + when(data.generated);
    body.dataset.loaded = "true";
  }

  function showLogin(message) {
    $("content").hidden = true;
    $("login").hidden = false;
    $("message").textContent = message || "";
  }

  async function refresh() {
    clearTimeout(timer);
    const headers = { "X-Dynprov-Client": "web" };
    const token = sessionStorage.getItem(TOKEN_KEY);
    if (token) headers["Authorization"] = "Bearer " + token;
    try {
      const res = await fetch("api/v1/status", { headers: headers, cache: "no-store" });
      if (res.status === 401) {
        sessionStorage.removeItem(TOKEN_KEY);
        const why = await res.json().catch(() => ({}));
        showLogin(token ? (why.error || "session expired") : "");
        return;
      }
      if (!res.ok) {
        const why = await res.json().catch(() => ({}));
        $("message").textContent = why.error || ("status " + res.status);
      } else {
        $("message").textContent = "";
        $("login").hidden = true;
        $("content").hidden = false;
        render(await res.json());
      }
    } catch (err) {
      $("message").textContent = "server unreachable: " + err;
    }
    timer = setTimeout(refresh, poll);
  }

  $("login").addEventListener("submit", async (ev) => {
    ev.preventDefault();
    const user = $("user").value;
    const pass = $("password").value;
    const bytes = new TextEncoder().encode(user + ":" + pass);
    let bin = "";
    bytes.forEach((b) => { bin += String.fromCharCode(b); });
    try {
      const res = await fetch("api/v1/token", {
        method: "POST", cache: "no-store",
        headers: { "Authorization": "Basic " + btoa(bin), "X-Dynprov-Client": "web" },
      });
      const data = await res.json().catch(() => ({}));
      if (!res.ok) {
        showLogin(data.error || ("login failed: " + res.status));
        return;
      }
      sessionStorage.setItem(TOKEN_KEY, data.token);
      $("password").value = "";
      refresh();
    } catch (err) {
      showLogin("server unreachable: " + err);
    }
  });

  refresh();
})();
