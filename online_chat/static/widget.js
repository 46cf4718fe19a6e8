/* ivr-bridge chat widget. On any page of an origin listed in web.widget_origins:
     <script src="https://help.example.com/chat/widget.js" async></script>
   (optional data-lang="en" or "zh-CN"; else the page's <html lang>, else the visitor's browser language).
   It adds one button; the chat itself runs in a frame of the ivr-bridge site (its own origin, styles and
   security policy), full screen on a phone. Styles are set through the DOM (el.style), which a strict
   Content-Security-Policy of the host page allows. */
(function () {
  'use strict';
  var STRINGS = __STRINGS__;
  var script = document.currentScript;
  if (!script || window.ivrBridgeChatWidget) return;   // loaded twice: one button
  window.ivrBridgeChatWidget = true;
  var origin = new URL(script.src).origin;
  var lang = script.getAttribute('data-lang') || document.documentElement.lang || '';
  var words = STRINGS[/^zh/i.test(lang || navigator.language || '') ? 'zh-CN' : 'en'];
  var button = document.createElement('button');
  var frame = null;

  function style(el, values) { for (var name in values) el.style[name] = values[name]; }
  function place() {
    var phone = window.matchMedia('(max-width: 600px)').matches;
    style(frame, phone
      ? { left: '0', top: '0', right: '0', bottom: '0', width: '100%', height: '100%', borderRadius: '0' }
      : { left: 'auto', top: 'auto', right: '16px', bottom: '16px', width: '380px',
          height: 'min(620px, calc(100% - 32px))', borderRadius: '12px' });
  }
  function open() {
    if (!frame) {
      frame = document.createElement('iframe');
      frame.title = words.open;
      frame.src = origin + '/chat?embed=1' + (lang ? '&lang=' + encodeURIComponent(lang) : '');
      style(frame, { position: 'fixed', zIndex: '2147483001', border: '0', background: '#fff',
                     boxShadow: '0 4px 24px rgba(0, 0, 0, .3)' });
      place();
      document.body.appendChild(frame);
      window.addEventListener('resize', place);
    }
    frame.style.display = 'block';
    button.style.display = 'none';
  }
  function hide() {
    if (frame) frame.style.display = 'none';
    button.style.display = '';
    button.focus();
  }

  button.type = 'button';
  button.textContent = words.open;
  button.setAttribute('aria-label', words.open);
  style(button, { position: 'fixed', right: '16px', bottom: '16px', zIndex: '2147483000', minHeight: '48px',
                  padding: '0 20px', border: '0', borderRadius: '24px', background: '#0b57d0', color: '#fff',
                  font: '600 16px system-ui, sans-serif', boxShadow: '0 2px 8px rgba(0, 0, 0, .3)',
                  cursor: 'pointer' });
  button.addEventListener('click', open);
  window.addEventListener('message', function (event) {
    // only the chat's own frame may close it
    if (event.origin === origin && frame && event.source === frame.contentWindow && event.data &&
        event.data.type === 'ivr-bridge-chat' && event.data.action === 'hide') hide();
  });
  if (document.body) document.body.appendChild(button);
  else document.addEventListener('DOMContentLoaded', function () { document.body.appendChild(button); });
})();
