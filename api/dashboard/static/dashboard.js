// What every dashboard page's controls do beyond plain HTML (the Content Security Policy runs
// no inline script, so no control carries an inline handler):
// - a <select data-submit-on-change> submits its form as soon as it is changed;
// - a <button data-copy="ID"> copies the text of element ID to the clipboard and says so.
(function () {
  function wire() {
    document.querySelectorAll("select[data-submit-on-change]").forEach(function (select) {
      select.addEventListener("change", function () { select.form.requestSubmit(); });
    });
    document.querySelectorAll("button[data-copy]").forEach(function (button) {
      button.addEventListener("click", function () {
        var source = document.getElementById(button.dataset.copy);
        var said = document.getElementById(button.dataset.copy + "-copied");
        navigator.clipboard.writeText(source.textContent.trim()).then(function () {
          if (said) said.textContent = "Copied.";
        }, function () {
          if (said) said.textContent = "Could not copy: select the key and copy it by hand.";
        });
      });
    });
  }
  if (document.readyState === "loading") document.addEventListener("DOMContentLoaded", wire);
  else wire();
})();
