// pushworker console: the only script (Content-Security-Policy: script-src 'self').
// An element with data-poll="URL" is refreshed every data-every ms from that URL (a fragment
// rendered and escaped on the server); data-select picks the part of a full page to take.
// Polling stops once the fragment holds an element with data-final="yes".
(function () {
  "use strict";
  function poll(element) {
    var url = element.getAttribute("data-poll");
    var every = parseInt(element.getAttribute("data-every") || "2000", 10);
    var select = element.getAttribute("data-select");
    function tick() {
      fetch(url, { credentials: "same-origin", headers: { "X-Requested-With": "fetch" } })
        .then(function (answer) { return answer.ok ? answer.text() : null; })
        .then(function (html) {
          if (html === null) { return; }
          var parsed = new DOMParser().parseFromString(html, "text/html");
          var source = select ? parsed.querySelector(select) : parsed.body;
          if (source) { element.replaceChildren.apply(element, Array.from(source.childNodes)); }
          if (element.querySelector('[data-final="yes"]')) { window.location.reload(); return; }
          window.setTimeout(tick, every);
        })
        .catch(function () { window.setTimeout(tick, every * 2); });
    }
    window.setTimeout(tick, every);
  }
  document.addEventListener("DOMContentLoaded", function () {
    document.querySelectorAll("[data-poll]").forEach(poll);
  });
})();
