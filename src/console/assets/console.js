// portcullis approver console: live lists. Every page works without this
// script; with it, a list page refreshes its rows every 5 s from the same
// URL (?fragment=1 answers only the server-rendered, escaped rows).
"use strict";
(function () {
  var live = document.getElementById("live");
  var path = window.location.pathname;
  if (!live || (path !== "/ui/pending" && path !== "/ui/reviews")) {
    return;
  }
  window.setInterval(function () {
    fetch(path + "?fragment=1", { credentials: "same-origin", cache: "no-store" })
      .then(function (r) { return r.ok ? r.text() : null; })
      .then(function (html) {
        if (html === null) { return; }
        var doc = new DOMParser().parseFromString(html, "text/html");
        var next = doc.getElementById("live");
        var now = document.getElementById("live");
        if (next && now) { now.replaceWith(next); }
      })
      .catch(function () {});
  }, 5000);
})();
