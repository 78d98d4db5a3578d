// Draws the usage page's chart (GPU-seconds per bucket, one series per model) with uPlot,
// from the JSON the page embeds. No data leaves the page.
(function () {
  function draw() {
    var holder = document.getElementById("chart");
    var source = document.getElementById("chart-data");
    if (!holder || !source || typeof uPlot === "undefined") return;
    var chart = JSON.parse(source.textContent);
    var models = Object.keys(chart.series).sort();
    var stamps = {};
    models.forEach(function (m) { Object.keys(chart.series[m]).forEach(function (t) { stamps[t] = true; }); });
    var times = Object.keys(stamps).sort();
    var xs = times.map(function (t) { return Date.parse(t) / 1000; });
    var data = [xs].concat(models.map(function (m) {
      return times.map(function (t) { return chart.series[m][t] || 0; });
    }));
    var palette = ["#0b4f9c", "#c2410c", "#15803d", "#7e22ce", "#b91c1c"];
    var series = [{}].concat(models.map(function (m, i) {
      return { label: m, stroke: palette[i % palette.length], width: 2, points: { show: true } };
    }));
    holder.dataset.points = String(xs.length);
    holder.dataset.total = String(data.slice(1).reduce(function (sum, row) {
      return sum + row.reduce(function (a, b) { return a + b; }, 0);
    }, 0));
    var width = Math.max(280, holder.clientWidth || 600);
    new uPlot({ width: width, height: 280, series: series,
                axes: [{}, { label: "GPU-seconds" }] }, data, holder);
    holder.dataset.drawn = "true";
  }
  if (document.readyState === "loading") document.addEventListener("DOMContentLoaded", draw);
  else draw();
})();
