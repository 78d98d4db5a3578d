// Draws the usage page's chart (GPU-seconds per bucket, one series per model) with uPlot,
// from the JSON the page embeds. No data leaves the page.
(function () {
  function draw() {
    var holder = document.getElementById("chart");
    var source = document.getElementById("chart-data");
    if (!holder || !source || typeof uPlot === "undefined") return;
    var chart = JSON.parse(source.textContent);
    var models = Object.keys(chart.series).sort();
    // every hour or day of the range is a point, zero where nothing ran
    var times = chart.buckets;
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
    new uPlot({
      width: width, height: 280, series: series,
      // the x-axis spans the chosen range ending now, whatever the data, in UTC
      scales: { x: { time: true, range: function () { return [chart.from, chart.to]; } } },
      tzDate: function (ts) { return uPlot.tzDate(new Date(ts * 1000), "Etc/UTC"); },
      axes: [{}, { label: "GPU-seconds" }],
      hooks: { draw: [function (plot) {  // the scale as drawn, for whoever checks it
        holder.dataset.xMin = String(plot.scales.x.min);
        holder.dataset.xMax = String(plot.scales.x.max);
        holder.dataset.drawn = "true";
      }] }
    }, data, holder);
  }
  if (document.readyState === "loading") document.addEventListener("DOMContentLoaded", draw);
  else draw();
})();
