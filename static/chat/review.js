// Reviewer keyboard: j / k move through the queue, Enter opens; on an item a approves,
// e edits, r rejects. Keys typed into a field are left alone.
(() => {
  const typing = (el) => el && (el.tagName === "INPUT" || el.tagName === "TEXTAREA" || el.tagName === "SELECT");
  let selected = -1;
  const rows = () => Array.from(document.querySelectorAll("#review-queue .review-row"));
  const select = (i) => {
    const all = rows();
    if (!all.length) return;
    selected = Math.max(0, Math.min(all.length - 1, i));
    all.forEach((row, n) => row.classList.toggle("selected", n === selected));
    all[selected].focus();
  };
  document.addEventListener("keydown", (event) => {
    if (typing(event.target) || event.ctrlKey || event.metaKey || event.altKey) return;
    const item = document.querySelector(".review-item");
    const key = event.key;
    if (!item) {
      if (key === "j") select(selected + 1);
      else if (key === "k") select(selected - 1);
      else if (key === "Enter" && selected >= 0) window.location = rows()[selected].dataset.href;
      else return;
      event.preventDefault();
      return;
    }
    if (key === "a" && document.getElementById("approve-form")) {
      document.getElementById("approve-form").requestSubmit();
    } else if (key === "e" && document.getElementById("edit-text")) {
      document.getElementById("edit-text").focus();
    } else if (key === "r" && document.getElementById("reject-reason")) {
      document.getElementById("reject-reason").focus();
    } else if (key === "j" || key === "k") {
      const url = key === "j" ? item.dataset.next : item.dataset.previous;
      if (url) window.location = url;
    } else {
      return;
    }
    event.preventDefault();
  });
})();
