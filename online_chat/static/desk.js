/* ivr-bridge agent desktop and supervisor view.
 *
 * One websocket per page (/desk/ws, /desk/supervisor/ws); the server sends whole states, this script draws them.
 * Everything from the server (names, numbers, IVR entries, chat text) reaches the page through textContent or
 * text nodes, never as HTML. The Content-Security-Policy allows no inline script, so this file is all of it.
 */
"use strict";

(() => {
  const page = document.body.dataset.page;
  let t = {};        // UI strings of the agent's language (hello frame)
  let lang = document.documentElement.lang || "en";
  let offset = 0;    // the server's clock minus this one, seconds

  const now = () => Date.now() / 1000 + offset;
  const $ = (id) => document.getElementById(id);

  /* An element with attributes (class, text, others as given) and children (nodes or strings: text nodes). */
  function el(tag, attrs, ...children) {
    const node = document.createElement(tag);
    for (const [name, value] of Object.entries(attrs || {})) {
      if (value === null || value === undefined || value === false) continue;
      if (name === "class") node.className = value;
      else if (name === "text") node.textContent = String(value);
      else node.setAttribute(name, value === true ? "" : String(value));
    }
    for (const child of children) {
      if (child !== null && child !== undefined && child !== false) node.append(child);
    }
    return node;
  }

  function tr(key, vars) {
    let text = t[key] || key;
    for (const [name, value] of Object.entries(vars || {})) text = text.replace("{" + name + "}", String(value));
    return text;
  }

  function duration(seconds) {
    const s = Math.max(0, Math.floor(seconds));
    const pad = (n) => String(n).padStart(2, "0");
    const h = Math.floor(s / 3600);
    const m = Math.floor((s % 3600) / 60);
    return h ? `${h}:${pad(m)}:${pad(s % 60)}` : `${m}:${pad(s % 60)}`;
  }

  function clock(ts) {
    return new Date(ts * 1000).toLocaleTimeString(lang, { hour: "2-digit", minute: "2-digit" });
  }

  /* A random id for a message the agent sends (crypto.randomUUID needs HTTPS; this works on plain HTTP too). */
  function clientId() {
    return [...crypto.getRandomValues(new Uint8Array(16))].map((b) => b.toString(16).padStart(2, "0")).join("");
  }

  function when(ts) {
    return ts ? new Date(ts * 1000).toLocaleString(lang, { dateStyle: "medium", timeStyle: "short" }) : "";
  }

  function channelName(channel) {
    return t["desk_channel_" + channel] || channel || "";
  }

  /* Live clocks: [data-since] counts up from a time, [data-until] counts down to one, [data-fixed] is a
   * duration that no longer changes; data-label is a string key with {s}, or a prefix. */
  function tick() {
    for (const node of document.querySelectorAll("[data-since]")) {
      node.textContent = (node.dataset.prefix || "") + duration(now() - Number(node.dataset.since));
    }
    for (const node of document.querySelectorAll("[data-until]")) {
      const left = Math.max(0, Math.ceil(Number(node.dataset.until) - now()));
      node.textContent = node.dataset.label ? tr(node.dataset.label, { s: left }) : duration(left);
    }
  }

  function emptyNote(container) {
    const empty = container.dataset.empty;
    const has = [...container.children].some((c) => !c.classList.contains("empty"));
    const note = container.querySelector(":scope > .empty");
    if (!has && !note && empty) container.append(el("p", { class: "empty", text: empty }));
    if (has && note) note.remove();
  }

  /* The websocket: reconnects with backoff, pings, matches replies to requests. */
  function connect(path, onFrame) {
    const status = $("conn");
    const pending = new Map();
    let ws = null;
    let opened = false;
    let delay = 500;
    let pinger = null;
    let nextId = 1;

    function show(key, ok) {
      if (!status) return;
      status.textContent = t[key] || status.textContent;
      status.classList.toggle("down", !ok);
    }

    function open() {
      opened = false;
      ws = new WebSocket((location.protocol === "https:" ? "wss://" : "ws://") + location.host + path);
      ws.onopen = () => {
        opened = true;
        delay = 500;
        pinger = setInterval(() => send({ type: "ping" }), 25000);
      };
      ws.onmessage = (event) => {
        let frame;
        try { frame = JSON.parse(event.data); } catch { return; }
        if (typeof frame.server_time === "number") offset = frame.server_time - Date.now() / 1000;
        if (frame.type === "hello") {
          t = frame.t;
          lang = frame.language;
          show("desk_connected", true);
        }
        if (frame.type === "reply") {
          const done = pending.get(frame.id);
          pending.delete(frame.id);
          if (done) done(frame);
          return;
        }
        onFrame(frame);
      };
      ws.onclose = (event) => {
        clearInterval(pinger);
        for (const done of pending.values()) done({ ok: false, error: "unavailable" });
        pending.clear();
        if (event.code === 4401 || event.code === 4403) {
          location.assign("/desk/login");
          return;
        }
        show("desk_reconnecting", false);
        if (!opened) {
          // Refused before the upgrade: the session may have ended (the page itself then redirects).
          fetch(location.pathname, { redirect: "manual", cache: "no-store", credentials: "same-origin" })
            .then((r) => { if (r.type === "opaqueredirect" || r.status === 403) location.assign("/desk/login"); })
            .catch(() => {});
        }
        setTimeout(open, delay);
        delay = Math.min(delay * 2, 10000);
      };
    }

    function send(frame) {
      if (ws && ws.readyState === WebSocket.OPEN) ws.send(JSON.stringify(frame));
    }

    function request(frame) {
      return new Promise((resolve) => {
        if (!ws || ws.readyState !== WebSocket.OPEN) {
          resolve({ ok: false, error: "unavailable" });
          return;
        }
        const id = nextId++;
        pending.set(id, resolve);
        ws.send(JSON.stringify({ ...frame, id }));
      });
    }

    open();
    return { send, request };
  }

  /* ------------------------------------------------------------------------------------------ desktop */
  function desktop() {
    let hello = null;
    const items = new Map();   // interaction -> {item (from state), node}
    const cards = new Map();   // interaction -> card frame
    const chats = new Map();   // interaction -> its chat pane (kept across redraws: drafts survive)
    const socket = connect("/desk/ws", onFrame);

    for (const button of document.querySelectorAll("[data-presence]")) {
      button.addEventListener("click", async () => {
        const reply = await socket.request({ type: "presence", presence: button.dataset.presence });
        $("status-note").textContent = reply.ok ? "" : tr("desk_err_" + reply.error);
      });
    }

    function onFrame(frame) {
      if (frame.type === "hello") {
        hello = frame;
        for (const button of document.querySelectorAll("[data-presence]")) button.disabled = false;
        drawOwed(frame.owed);
      } else if (frame.type === "state") {
        drawState(frame);
      } else if (frame.type === "card") {
        cards.set(frame.interaction, frame);
        const entry = items.get(frame.interaction);
        if (entry) redraw(entry);
      } else if (frame.type === "ended") {
        ended(frame.interaction);
      } else if (frame.type === "chat-message") {
        message(frame);
      } else if (frame.type === "chat-typing") {
        typing(frame.interaction, frame.on);
      } else if (frame.type === "chat-state" && frame.state === "closed" && chats.has(frame.interaction)) {
        const chat = chats.get(frame.interaction);
        chat.note.textContent = t.desk_chat_closed;
        for (const field of chat.form.elements) field.disabled = true;
      }
    }

    function drawState(state) {
      $("presence").textContent = tr("desk_presence_" + state.presence);
      $("presence").className = "presence-" + state.presence;
      const left = $("wrapup-left");
      if (state.presence === "wrapup" && state.wrapup_until) left.dataset.until = state.wrapup_until;
      else { delete left.dataset.until; left.textContent = ""; }
      $("load-voice").textContent = `${state.voice}/${state.cap_voice}`;
      $("load-chat").textContent = `${state.chat}/${state.cap_chat}`;
      for (const button of document.querySelectorAll("[data-presence]")) {
        button.setAttribute("aria-pressed", String(button.dataset.presence === state.presence));
      }
      const seen = new Set();
      for (const item of state.work) {
        seen.add(item.interaction);
        const entry = items.get(item.interaction);
        if (!entry) {
          const fresh = { item, node: null };
          items.set(item.interaction, fresh);
          redraw(fresh);
        } else if (entry.item.state !== item.state) {
          entry.item = item;
          redraw(entry);
        } else {
          entry.item = item;
        }
      }
      for (const [iid, entry] of items) {
        if (!seen.has(iid)) {
          entry.node.remove();
          items.delete(iid);
          chats.delete(iid);
        }
      }
      emptyNote($("offers"));
      emptyNote($("work"));
      tick();
    }

    /* (Re)build the element of an interaction in its place: an offer, or work in hand. */
    function redraw(entry) {
      const { item } = entry;
      const frame = cards.get(item.interaction);
      const card = (frame && frame.card) || { channel: item.channel, skill: item.skill };
      const offer = item.state === "offered";
      const node = el("article", { class: `item channel-${item.channel}`, "data-interaction": item.interaction });
      const number = card.number || "";
      const wait = el("span", { class: "timer" });
      const queued = item.queued_at || card.queued_at;
      if (item.accepted_at && queued) wait.textContent = t.desk_wait + " " + duration(item.accepted_at - queued);
      else if (queued) { wait.dataset.since = queued; wait.dataset.prefix = t.desk_wait + " "; }
      node.append(el("header", {},
        el("span", { class: "badge", text: channelName(item.channel) }),
        el("strong", { class: "number", text: number }),
        el("span", { class: "skill", text: item.skill }),
        item.mode === "callback" ? el("span", { class: "badge", text: t.desk_callback }) : null,
        wait));
      if (offer) {
        const deadline = el("p", { class: "deadline" });
        if (item.deadline) { deadline.dataset.until = item.deadline; deadline.dataset.label = "desk_offer_expires"; }
        const note = el("p", { class: "note", role: "status" });
        const accept = el("button", { type: "button", class: "accept", text: t.desk_accept });
        const decline = el("button", { type: "button", class: "quiet", text: t.desk_decline });
        accept.addEventListener("click", async () => {
          accept.disabled = decline.disabled = true;
          const reply = await socket.request({ type: "accept", interaction: item.interaction });
          if (!reply.ok) { note.textContent = tr("desk_err_" + reply.error); accept.disabled = decline.disabled = false; }
        });
        decline.addEventListener("click", async () => {
          accept.disabled = decline.disabled = true;
          const reply = await socket.request({ type: "decline", interaction: item.interaction });
          if (!reply.ok) note.textContent = tr("desk_err_" + reply.error);
        });
        node.append(deadline, el("div", { class: "actions" }, accept, decline), note);
      }
      node.append(details(card));
      if (!offer) {   // a chat's conversation first; a call's tools first (its chat, if any, is an extra)
        const slot = el("div", { class: "chat-slot" });
        node.append(...(item.channel === "voice" ? [actions(item, card), slot] : [slot, actions(item, card)]));
      }
      if (frame) node.append(timeline(frame.timeline, item.interaction));
      const container = offer ? $("offers") : $("work");
      if (entry.node && entry.node.parentNode === container) entry.node.replaceWith(node);
      else { if (entry.node) entry.node.remove(); container.append(node); }
      entry.node = node;
      if (!offer && hello.chat && item.channel !== "voice") pane(item.interaction);
      attach(item.interaction);
      emptyNote($("offers"));
      emptyNote($("work"));
      tick();
    }

    /* The call card: intent, the IVR path and what the caller entered. */
    function details(card) {
      const list = el("dl", { class: "card" });
      const row = (label, value) => {
        if (value) list.append(el("dt", { text: label }), el("dd", { text: value }));
      };
      row(t.desk_intent, card.intent ? (card.intent_title ? `${card.intent_title} (${card.intent})` : card.intent) : "");
      row(t.desk_dialled, card.dialled);
      row(t.desk_language, card.language);
      const box = el("div", { class: "details" }, list);
      if (card.path && card.path.length) {
        const path = el("ol", { class: "path", "aria-label": t.desk_path });
        for (const step of card.path) {
          const bits = [step.node];
          if (step.event !== "enter") bits.push(step.event);
          if (step.value) bits.push(step.value);
          path.append(el("li", { text: bits.join(" · ") }));
        }
        box.append(el("h3", { text: t.desk_path }), path);
      }
      if (card.variables && card.variables.length) {
        const vars = el("dl", { class: "vars" });
        for (const [name, value] of card.variables) vars.append(el("dt", { text: name }), el("dd", { text: value }));
        box.append(el("h3", { text: t.desk_variables }), vars);
      }
      return box;
    }

    /* Transfer to a skill, send an FAQ link. */
    function actions(item, card) {
      const box = el("div", { class: "tools" });
      const note = el("p", { class: "note", role: "status" });
      const said = (reply, okText) => { note.textContent = reply.ok ? okText : tr("desk_err_" + reply.error); };

      const articleId = `faq-${item.interaction}`;
      const articles = el("select", { id: articleId });
      for (const [id, title] of hello.articles) articles.append(el("option", { value: id, text: title }));
      const faq = el("button", { type: "button", text: t.desk_send_faq });
      faq.addEventListener("click", async () => {
        faq.disabled = true;
        said(await socket.request({ type: "faq", interaction: item.interaction, article: articles.value }),
             t.desk_send_faq + " ✓");
        faq.disabled = false;
      });
      box.append(el("div", { class: "row" }, el("label", { for: articleId, text: t.desk_article }), articles, faq));

      const skillId = `skill-${item.interaction}`;
      const skills = el("select", { id: skillId });
      for (const skill of hello.skills) {
        if (skill !== card.skill) skills.append(el("option", { value: skill, text: skill }));
      }
      const transfer = el("button", { type: "button", text: t.desk_transfer });
      transfer.disabled = skills.options.length === 0;
      transfer.addEventListener("click", async () => {
        transfer.disabled = true;
        const reply = await socket.request({ type: "transfer", interaction: item.interaction, skill: skills.value });
        said(reply, t.desk_transfer + " ✓");
        transfer.disabled = reply.ok;
      });
      box.append(el("div", { class: "row" }, el("label", { for: skillId, text: t.desk_transfer_to }), skills, transfer));
      if (hello.chat && item.channel !== "voice") {
        const end = el("button", { type: "button", class: "quiet", text: t.desk_end_chat });
        end.addEventListener("click", async () => {
          end.disabled = true;
          const reply = await socket.request({ type: "chat-close", interaction: item.interaction });
          said(reply, t.desk_chat_closed);
          end.disabled = reply.ok;
        });
        box.append(el("div", { class: "row" }, end));
      }
      box.append(note);
      return box;
    }

    /* The chat pane of an interaction: its messages in order, the customer typing, canned replies, a box. */
    function pane(iid) {
      if (chats.has(iid)) return chats.get(iid);
      const log = el("ol", { class: "messages", "aria-live": "polite" });
      const typingNote = el("p", { class: "typing", hidden: true, text: t.desk_typing });
      const id = `msg-${iid}`;
      const box = el("textarea", { id, rows: 2, maxlength: hello.max_message, enterkeyhint: "send" });
      const canned = el("select", { "aria-label": t.desk_canned }, el("option", { value: "", text: t.desk_canned }),
        ...hello.canned.map((text, i) => el("option", { value: String(i), text })));
      const send = el("button", { type: "submit", text: t.desk_send });
      const note = el("p", { class: "note", role: "status" });
      const form = el("form", { class: "compose" }, el("label", { for: id, text: t.desk_message }), box,
        el("div", { class: "row" }, canned, send), note);
      let typedAt = 0;
      canned.addEventListener("change", () => {
        if (canned.value === "") return;
        box.value = (box.value ? box.value + " " : "") + hello.canned[Number(canned.value)];
        canned.value = "";
        box.focus();
      });
      box.addEventListener("input", () => {
        if (Date.now() - typedAt > 3000) {
          typedAt = Date.now();
          socket.send({ type: "chat-typing", interaction: iid, on: true });
        }
      });
      box.addEventListener("keydown", (event) => {
        if (event.key === "Enter" && !event.shiftKey && !event.isComposing) {
          event.preventDefault();
          form.requestSubmit();
        }
      });
      form.addEventListener("submit", async (event) => {
        event.preventDefault();
        const text = box.value.trim();
        if (!text) return;
        send.disabled = true;
        const reply = await socket.request({ type: "chat-send", interaction: iid, text, client_id: clientId() });
        send.disabled = false;
        note.textContent = reply.ok ? "" : tr("desk_err_" + reply.error);
        if (reply.ok) {
          box.value = "";
          typedAt = 0;
          socket.send({ type: "chat-typing", interaction: iid, on: false });
        }
      });
      const chat = { node: el("section", { class: "chat" }, log, typingNote, form), log, typingNote, form, note,
                     seen: new Set(), hide: null };
      chats.set(iid, chat);
      return chat;
    }

    /* Put the pane into its interaction's element (a call shows one once its caller has written). */
    function attach(iid) {
      const entry = items.get(iid);
      const slot = entry && entry.node && entry.node.querySelector(".chat-slot");
      if (slot && chats.has(iid) && !slot.contains(chats.get(iid).node)) slot.append(chats.get(iid).node);
    }

    function message(m) {
      const chat = pane(m.interaction);
      if (chat.seen.has(m.seq)) return;   // sent again after a reconnect
      chat.seen.add(m.seq);
      const who = m.sender === "visitor" ? t.desk_from_visitor
        : m.sender === "agent" ? (m.agent === hello.agent ? t.desk_from_you : m.agent) : t.desk_from_system;
      const line = el("li", { class: `msg from-${m.sender}`, "data-seq": m.seq },
        el("span", { class: "from", text: who }), el("time", { text: clock(m.at) }),
        el("p", { class: "text", text: m.text }));
      const later = [...chat.log.children].find((child) => Number(child.dataset.seq) > m.seq);
      chat.log.insertBefore(line, later || null);
      chat.log.scrollTop = chat.log.scrollHeight;
      if (m.sender === "visitor") typing(m.interaction, false);
      attach(m.interaction);
    }

    function typing(iid, on) {
      const chat = chats.get(iid);
      if (!chat) return;
      chat.typingNote.hidden = !on;
      clearTimeout(chat.hide);
      if (on) chat.hide = setTimeout(() => { chat.typingNote.hidden = true; }, 6000);
    }

    /* The customer's contacts on every channel, newest first. */
    function timeline(contacts, current) {
      const others = (contacts || []).filter((c) => c.interaction !== current);
      const box = el("details", { class: "timeline" }, el("summary", { text: `${t.desk_timeline} (${others.length})` }));
      if (!others.length) {
        box.append(el("p", { class: "empty", text: t.desk_timeline_empty }));
        return box;
      }
      const list = el("ol");
      for (const c of others) {
        const entry = el("li", {},
          el("span", { class: "badge", text: channelName(c.channel) }), " ",
          el("time", { text: when(c.started_at) }),
          c.intent ? el("span", { class: "intent", text: " · " + (c.intent_title || c.intent) }) : null,
          c.outcome ? el("span", { text: " · " + c.outcome }) : null,
          c.agent ? el("span", { text: ` · ${t.desk_agent} ${c.agent}` }) : null,
          c.wrapup_code ? el("span", { text: " · " + c.wrapup_code }) : null);
        if (c.sent.length) {
          const sent = el("ul", { class: "sent", "aria-label": t.desk_links_sent });
          for (const f of c.sent) {
            sent.append(el("li", { text: `${f.channel}: ${f.title || f.template} (${f.state}` +
              (f.opened_at ? `, ${t.desk_opened} ${when(f.opened_at)})` : ")") }));
          }
          entry.append(sent);
        }
        for (const s of c.surveys) entry.append(el("p", { class: "survey", text: tr("desk_survey", { score: s.score }) }));
        list.append(entry);
      }
      box.append(list);
      return box;
    }

    /* A wrap-up code is owed for an interaction that ended (now, or from before a reload). */
    function ended(iid) {
      const entry = items.get(iid);
      const frame = cards.get(iid);
      const card = (frame && frame.card) || {};
      owe({ interaction: iid, channel: card.channel || (entry && entry.item.channel), number: card.number,
            ended_at: now() });
    }

    function drawOwed(list) {
      $("owed").replaceChildren();
      for (const owed of list) owe(owed);
    }

    function owe(owed) {
      if (document.querySelector(`#owed [data-interaction="${CSS.escape(owed.interaction)}"]`)) return;
      const id = `code-${owed.interaction}`;
      const codes = el("select", { id });
      for (const [code, label] of hello.wrapup_codes) codes.append(el("option", { value: code, text: label }));
      const save = el("button", { type: "button", text: t.desk_save });
      const note = el("p", { class: "note", role: "status" });
      const node = el("article", { class: "item owed", "data-interaction": owed.interaction },
        el("header", {}, el("span", { class: "badge", text: channelName(owed.channel) }),
          el("strong", { class: "number", text: owed.number || "" }),
          el("span", { class: "timer", text: `${t.desk_ended} ${when(owed.ended_at)}` })),
        el("div", { class: "row" }, el("label", { for: id, text: t.desk_wrapup_code }), codes, save), note);
      save.addEventListener("click", async () => {
        save.disabled = true;
        const reply = await socket.request({ type: "wrapup", interaction: owed.interaction, code: codes.value });
        if (reply.ok) {
          node.remove();
          $("owed-section").hidden = !$("owed").children.length;
        } else {
          note.textContent = tr("desk_err_" + reply.error);
          save.disabled = false;
        }
      });
      $("owed").append(node);
      $("owed-section").hidden = false;
    }
  }

  /* ------------------------------------------------------------------------------------------ supervisor */
  function supervisor() {
    connect("/desk/supervisor/ws", (frame) => {
      if (frame.type === "supervisor") draw(frame);
    });

    function draw(view) {
      $("waiting-total").textContent = `(${view.waiting_total})`;
      const rows = view.skills.map((s) => {
        const longest = el("td", { class: "timer" });
        if (s.waiting && s.oldest_queued_at) longest.dataset.since = s.oldest_queued_at;
        else longest.textContent = "–";
        return el("tr", { "data-skill": s.skill }, el("th", { scope: "row", text: s.skill }),
          el("td", { class: "waiting", text: s.waiting }), longest,
          el("td", { text: s.active + s.offered }), el("td", { text: s.ready }));
      });
      document.querySelector("#skills tbody").replaceChildren(...rows);

      const queue = $("queue");
      queue.replaceChildren(...view.queue.map((q) => el("li", { "data-interaction": q.interaction },
        el("span", { class: "badge", text: channelName(q.channel) }), " ",
        el("span", { class: "skill", text: q.skill }), " ",
        el("span", { class: "timer", "data-since": q.queued_at }))));
      emptyNote(queue);

      const agents = $("agents");
      agents.replaceChildren(...view.agents.map((a) => {
        const presence = el("span", { class: `badge presence-${a.presence}`, text: tr("desk_presence_" + a.presence) });
        const row = el("li", { "data-agent": a.agent },
          el("strong", { class: "name", text: a.name }), " ", presence,
          a.presence === "wrapup" && a.wrapup_until ? el("span", { class: "timer", "data-until": a.wrapup_until }) : null,
          el("span", { class: "load", text: ` ${t.desk_load_voice} ${a.voice}/${a.cap_voice} · ` +
                                             `${t.desk_load_chat} ${a.chat}/${a.cap_chat}` }),
          el("span", { class: "skills", text: a.skills.join(", ") }));
        return row;
      }));
      emptyNote(agents);
      tick();
    }
  }

  setInterval(tick, 1000);
  if (page === "desk") desktop();
  else if (page === "supervisor") supervisor();
})();
