// A campaign's page keeps its figures current while the campaign sends: it asks the
// server for them every second (no library, no other host) and stops once it has ended.
(function () {
  "use strict";
  var section = document.getElementById("progress");
  if (!section) { return; }
  var source = section.getAttribute("data-source");
  var number = new Intl.NumberFormat("en-US");

  function field(name) { return section.querySelector('[data-field="' + name + '"]'); }

  function show(p) {
    field("status").textContent = p.status;
    ["sent", "failed", "unknown", "remaining"].forEach(function (name) {
      field(name).textContent = number.format(p[name]);
    });
    field("bar").style.width = p.percent + "%";
    section.querySelector('[role="progressbar"]').setAttribute("aria-valuenow", p.percent);
    var list = field("failed_by_reason");
    list.textContent = "";
    var reasons = Object.keys(p.failed_by_reason).sort();
    if (reasons.length === 0) { reasons = [null]; }
    reasons.forEach(function (reason) {
      var item = document.createElement("li");
      item.textContent = reason === null ? "none" : reason + ": " + number.format(p.failed_by_reason[reason]);
      list.appendChild(item);
    });
    section.setAttribute("data-live", p.live ? "true" : "false");
  }

  function poll() {
    fetch(source, { credentials: "same-origin", headers: { "Accept": "application/json" } })
      .then(function (r) { return r.ok ? r.json() : null; })
      .then(function (p) {
        if (p) { show(p); }
        if (!p || p.live) { window.setTimeout(poll, 1000); }
      })
      .catch(function () { window.setTimeout(poll, 3000); });
  }

  if (section.getAttribute("data-live") === "true") { window.setTimeout(poll, 1000); }
}());
