/* ivr-bridge web chat: the page /chat (also inside the widget's frame) and the chat of a texted link.
   Protocol: see online_chat/chat.py. Every text from the server or the visitor goes into the page with
   textContent, never as HTML. */
(function () {
  'use strict';
  var root = document.getElementById('chat');
  if (!root) return;
  var T = JSON.parse(document.getElementById('chat-strings').textContent);
  var KEY = 'ivr-bridge-chat-token';
  var $ = function (id) { return document.getElementById(id); };
  var scroller = $('chat-scroll'), log = $('chat-log'), outbox = $('chat-outbox'), typingEl = $('chat-typing');
  var statusEl = $('chat-status'), notice = $('chat-notice'), form = $('chat-form'), input = $('chat-text');
  var sendBtn = $('chat-send'), endBtn = $('chat-end'), newBtn = $('chat-new'), hideBtn = $('chat-hide');
  var joined = root.getAttribute('data-joined') === '1';
  var maxLen = parseInt(root.getAttribute('data-max'), 10) || 2000;
  var lang = document.documentElement.lang || 'en';

  var token = root.getAttribute('data-token') || stored();
  var ws = null, opened = false, retries = 0, timer = null, starting = false;
  var lastSeq = 0;          // the highest message number shown (the server sends them in order)
  var state = '';
  var pending = [];         // {cid, text, el, acked}: written here, not in the log yet
  var typingSent = 0, typingIdle = null, typingHide = null;

  function stored() {
    try { return localStorage.getItem(KEY) || ''; } catch (e) { return ''; }
  }
  function remember(value) {
    if (joined) return;     // a call's chat comes from its link, not from this browser's memory
    try { if (value) localStorage.setItem(KEY, value); else localStorage.removeItem(KEY); } catch (e) { /* private mode */ }
  }
  function newId() {
    var bytes = new Uint8Array(12);
    crypto.getRandomValues(bytes);
    return Array.prototype.map.call(bytes, function (b) { return ('0' + b.toString(16)).slice(-2); }).join('');
  }
  function showNotice(text) { notice.textContent = text || ''; notice.hidden = !text; }
  function atBottom() { return scroller.scrollHeight - scroller.scrollTop - scroller.clientHeight < 48; }
  function stick(yes) { if (yes) scroller.scrollTop = scroller.scrollHeight; }
  function errorText(code) { return (T['chat_error_' + code] || T.chat_error_other).replace('{n}', String(maxLen)); }

  function bubble(from, text) {
    var li = document.createElement('li');
    var who = document.createElement('span');
    var body = document.createElement('span');
    li.className = 'msg from-' + (from === 'visitor' || from === 'agent' ? from : 'system');
    who.className = 'who';
    who.textContent = from === 'visitor' ? T.chat_you : from === 'agent' ? T.chat_agent : T.chat_system;
    body.className = 'text';
    body.textContent = text;
    li.appendChild(who);
    li.appendChild(body);
    return li;
  }

  // ---- frames from the server
  function onMessage(m) {
    if (m.seq <= lastSeq) return;
    lastSeq = m.seq;
    var wasAtBottom = atBottom(), el = null;
    for (var i = 0; i < pending.length; i++) {
      if (m.cid && pending[i].cid === m.cid) { el = pending[i].el; pending.splice(i, 1); break; }
    }
    if (el) {
      el.classList.remove('pending', 'failed');
      el.querySelector('.text').textContent = m.text;   // as stored
    } else {
      el = bubble(m.from, m.text);
    }
    el.setAttribute('data-seq', String(m.seq));
    log.appendChild(el);
    if (m.from === 'agent') typingEl.hidden = true;
    stick(wasAtBottom || m.from === 'visitor');
  }
  function onAck(a) {
    pending.forEach(function (p) { if (p.cid === a.cid) { p.acked = true; p.el.classList.remove('pending'); } });
  }
  function onError(e) {
    showNotice(errorText(e.code));
    for (var i = 0; i < pending.length; i++) {
      var p = pending[i];
      if (p.cid !== e.cid) continue;
      if (e.code === 'rate_limited' || e.code === 'unavailable') {
        setTimeout(function () { transmit(p); }, 5000);   // the same cid: stored once whatever happens
      } else {
        p.el.classList.add('failed');
        p.el.querySelector('.who').textContent = T.chat_failed;
        pending.splice(i, 1);
      }
      return;
    }
  }
  function onState(s) {
    state = s.state;
    joined = joined || s.joined === true;
    var closed = state === 'closed';
    statusEl.textContent = state === 'active' ? T.chat_active : closed ? T.chat_closed
      : joined ? T.chat_call_note : T.chat_waiting;
    input.disabled = closed;
    sendBtn.disabled = closed;
    endBtn.hidden = closed || joined;
    newBtn.hidden = !closed || joined;
    if (closed) {
      typingEl.hidden = true;
      remember('');
      pending.forEach(function (p) { p.el.classList.add('failed'); });
      pending = [];
      drop();
    }
  }
  function onTyping(t) {
    if (t.from !== 'agent') return;
    clearTimeout(typingHide);
    var wasAtBottom = atBottom();
    typingEl.hidden = !t.on;
    if (t.on) typingHide = setTimeout(function () { typingEl.hidden = true; }, 8000);
    stick(wasAtBottom);
  }
  var handlers = { msg: onMessage, ack: onAck, error: onError, state: onState, typing: onTyping };

  // ---- the connection
  function connect() {
    clearTimeout(timer);
    timer = null;
    if (!token || ws) return;
    var path = '/chat/ws?t=' + encodeURIComponent(token) + '&after=' + lastSeq;
    var socket = new WebSocket((location.protocol === 'https:' ? 'wss://' : 'ws://') + location.host + path);
    ws = socket;
    opened = false;
    socket.onopen = function () {
      opened = true;
      retries = 0;
      showNotice('');
      pending.forEach(function (p) { if (!p.acked) transmit(p); });   // resent: stored once by their cid
    };
    socket.onmessage = function (event) {
      var frame;
      try { frame = JSON.parse(event.data); } catch (e) { return; }
      if (frame && handlers[frame.type]) handlers[frame.type](frame);
    };
    socket.onclose = function () {
      var wasOpen = opened;
      ws = null;
      opened = false;
      showNotice(T.chat_reconnecting);
      if (wasOpen) later(); else probe(path);
    };
  }
  function drop() {     // no more reconnecting (the chat ended, a new one starts)
    clearTimeout(timer);
    if (ws) { ws.onclose = null; ws.close(); ws = null; opened = false; }
  }
  function later() {
    var delay = Math.min(15000, 500 * Math.pow(2, retries++)) * (0.5 + Math.random() / 2);
    timer = setTimeout(connect, delay);
  }
  function probe(path) {  // the socket never opened: is the token still good, or is the network away?
    fetch(path, { cache: 'no-store', credentials: 'same-origin' }).then(function (r) {
      if (r.status === 400 || r.status === 404 || r.status === 410) expired(); else later();
    }, later);
  }
  function expired() {
    remember('');
    token = '';
    showNotice(T.chat_expired);
    if (joined) { input.disabled = true; sendBtn.disabled = true; } else { reset(false); }
  }
  function reset(clearNotice) {
    drop();
    token = '';
    lastSeq = 0;
    state = '';
    pending = [];
    log.textContent = '';
    outbox.textContent = '';
    typingEl.hidden = true;
    statusEl.textContent = T.chat_intro;
    input.disabled = false;
    sendBtn.disabled = false;
    endBtn.hidden = true;
    newBtn.hidden = true;
    if (clearNotice) showNotice('');
  }

  function transmit(p) {
    if (ws && opened && !p.acked) ws.send(JSON.stringify({ type: 'msg', cid: p.cid, text: p.text }));
  }
  function start() {    // the first message of a new chat: the chat is opened, then the message goes
    if (starting) return;
    starting = true;
    fetch('/chat/start', { method: 'POST', credentials: 'same-origin', headers: { 'Content-Type': 'application/json' },
                           body: JSON.stringify({ lang: lang }) })
      .then(function (r) { return r.json().then(function (body) { return { ok: r.ok, body: body }; }); })
      .then(function (answer) {
        starting = false;
        if (!answer.ok || !answer.body.token) {
          fail(answer.body && answer.body.error === 'rate_limited' ? T.chat_error_rate_limited : T.chat_unavailable);
          return;
        }
        token = answer.body.token;
        remember(token);
        connect();
      }, function () { starting = false; fail(T.chat_unavailable); });
  }
  function fail(text) {
    showNotice(text);
    pending.forEach(function (p) { p.el.classList.add('failed'); p.el.querySelector('.who').textContent = T.chat_failed; });
    pending = [];
  }

  // ---- the visitor
  function sendTyping(on) {
    clearTimeout(typingIdle);
    if (ws && opened && (on || typingSent)) ws.send(JSON.stringify({ type: 'typing', on: on }));
    typingSent = on ? Date.now() : 0;
  }
  form.addEventListener('submit', function (event) {
    event.preventDefault();
    var text = input.value.replace(/^\s+|\s+$/g, '');
    if (!text || state === 'closed') return;
    if (text.length > maxLen) { showNotice(errorText('too_long')); return; }
    input.value = '';
    var p = { cid: newId(), text: text, el: bubble('visitor', text), acked: false };
    p.el.classList.add('pending');
    pending.push(p);
    outbox.appendChild(p.el);
    stick(true);
    sendTyping(false);
    if (!token) start(); else if (ws) transmit(p); else connect();
  });
  input.addEventListener('keydown', function (event) {
    // Enter sends, Shift+Enter makes a new line; never while an input method composes (Chinese, Japanese ...)
    if (event.key === 'Enter' && !event.shiftKey && !event.isComposing && event.keyCode !== 229) {
      event.preventDefault();
      form.requestSubmit();
    }
  });
  input.addEventListener('input', function () {
    if (!ws || !opened) return;
    if (Date.now() - typingSent > 2000) sendTyping(true);
    clearTimeout(typingIdle);
    typingIdle = setTimeout(function () { sendTyping(false); }, 4000);
  });
  endBtn.addEventListener('click', function () {
    if (ws && opened) ws.send(JSON.stringify({ type: 'close' }));
  });
  newBtn.addEventListener('click', function () { reset(true); input.focus(); });
  if (hideBtn) {
    hideBtn.addEventListener('click', function () {
      window.parent.postMessage({ type: 'ivr-bridge-chat', action: 'hide' }, '*');  // the widget checks the origin
    });
  }
  if (token) connect();
})();
