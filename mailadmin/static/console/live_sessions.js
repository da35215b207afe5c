// The live sessions page: one page of rows from the websocket, kept up to date without reload.
// The server sends a whole page ("page") or what changed on it ("changes"); this script holds
// no more rows than the server's page. Texts come translated from the template.
"use strict";

(function () {
  const config = JSON.parse(document.getElementById("live-sessions-config").textContent);
  const strings = config.strings;
  const table = document.getElementById("live-sessions");
  const body = table.querySelector("tbody");
  const mayKick = table.dataset.mayKick === "true";
  const statusLine = document.getElementById("live-status");
  const emptyLine = document.getElementById("live-empty");
  const summaryLine = document.getElementById("live-summary");
  const previousButton = document.getElementById("live-previous");
  const nextButton = document.getElementById("live-next");
  const searchForm = document.getElementById("live-search");
  const kickForm = document.getElementById("live-kick");
  const CLOSE_NOT_ALLOWED = 4403;
  const MAX_RETRY_MS = 10000;

  const view = { search: "", page: 1 };
  let socket = null;
  let retryMs = 500;

  function format(text, values) {
    return text.replace(/%\((\w+)\)s/g, (_, name) => String(values[name]));
  }

  function setStatus(state, text) {
    statusLine.dataset.state = state;
    statusLine.textContent = text;
  }

  function cell(text, className) {
    const td = document.createElement("td");
    td.textContent = text;
    if (className) td.className = className;
    return td;
  }

  function fillRow(tr, row) {
    tr.dataset.id = row.id;
    tr.dataset.address = row.address;
    tr.dataset.state = row.state;
    tr.replaceChildren(
      cell(row.address || strings.no_login),
      cell(`${row.client}:${row.client_port}`),
      cell(row.tls || "—"),
      cell(row.process),
      cell(strings.states[row.state] || row.state, "state"),
      cell(new Date(row.since).toLocaleString()),
      cell(row.commands, "number"),
      cell(`${row.retrieved} (${row.retrieved_size})`, "number retrieved"),
      cell(`${row.marked} (${row.marked_size})`, "number marked"),
    );
    if (mayKick) {
      const td = document.createElement("td");
      const button = document.createElement("button");
      button.type = "button";
      button.className = "button kick";
      button.textContent = strings.kick;
      button.disabled = row.state === "kicking";
      button.addEventListener("click", () => kick(row));
      td.append(button);
      tr.append(td);
    }
  }

  function showSummary(message) {
    view.page = message.page;
    summaryLine.textContent = format(strings.summary, message);
    previousButton.disabled = message.page <= 1;
    nextButton.disabled = message.page >= message.pages;
    emptyLine.textContent = strings.empty;
    emptyLine.hidden = message.total > 0;
  }

  function showPage(message) {
    body.replaceChildren(
      ...message.rows.map((row) => {
        const tr = document.createElement("tr");
        fillRow(tr, row);
        return tr;
      }),
    );
    showSummary(message);
  }

  function applyChanges(message) {
    const rows = new Map();
    for (const tr of body.rows) rows.set(tr.dataset.id, tr);
    for (const id of message.remove) rows.delete(id);
    for (const row of message.upsert) {
      const tr = rows.get(row.id) || document.createElement("tr");
      fillRow(tr, row);
      rows.set(row.id, tr);
    }
    body.replaceChildren(...message.order.map((id) => rows.get(id)));
    showSummary(message);
  }

  function sendView() {
    if (socket && socket.readyState === WebSocket.OPEN) {
      socket.send(JSON.stringify({ action: "view", search: view.search, page: view.page }));
    }
  }

  function connect() {
    const scheme = window.location.protocol === "https:" ? "wss" : "ws";
    socket = new WebSocket(`${scheme}://${window.location.host}${config.socket_path}`);
    socket.addEventListener("open", () => {
      retryMs = 500;
      setStatus("connected", strings.connected);
      if (view.search || view.page > 1) sendView();
    });
    socket.addEventListener("message", (event) => {
      const message = JSON.parse(event.data);
      if (message.type === "page") showPage(message);
      else if (message.type === "changes") applyChanges(message);
    });
    socket.addEventListener("close", (event) => {
      if (event.code === CLOSE_NOT_ALLOWED) {
        setStatus("refused", strings.refused);
        return;
      }
      setStatus("reconnecting", strings.reconnecting);
      window.setTimeout(connect, retryMs);
      retryMs = Math.min(retryMs * 2, MAX_RETRY_MS);
    });
  }

  async function kick(row) {
    const question = format(strings.confirm_kick, { address: row.address || strings.no_login, client: row.client });
    if (!window.confirm(question)) return;
    const form = new FormData(kickForm);
    form.set("session", row.id);
    const response = await fetch(kickForm.action, { method: "POST", body: form, credentials: "same-origin" });
    if (!response.ok) {
      let reason = response.statusText;
      try {
        reason = (await response.json()).error || reason;
      } catch (error) {
        // not JSON: keep the status text
      }
      window.alert(format(strings.kick_failed, { reason }));
      return;
    }
    const tr = body.querySelector(`tr[data-id="${CSS.escape(row.id)}"]`);
    if (tr) {
      tr.dataset.state = "kicking";
      tr.querySelector(".state").textContent = strings.states.kicking;
      tr.querySelector("button.kick").disabled = true;
    }
  }

  searchForm.addEventListener("submit", (event) => {
    event.preventDefault();
    view.search = document.getElementById("live-search-text").value.trim();
    view.page = 1;
    sendView();
  });
  previousButton.addEventListener("click", () => {
    view.page = Math.max(1, view.page - 1);
    sendView();
  });
  nextButton.addEventListener("click", () => {
    view.page += 1;
    sendView();
  });

  connect();
})();
