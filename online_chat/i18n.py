"""UI text of the web pages in every UI language, and which language a request gets.

The language comes from ``?lang=`` (remembered in a ``lang`` cookie), then the cookie, then a hint from the page
(a link remembers the language its message was written in), then ``Accept-Language``, then English.
Article text comes from the catalogue; these are the words around it.
"""

from __future__ import annotations

from collections.abc import Mapping

LANGUAGES = ("en", "zh-CN")
DEFAULT = "en"

UI: dict[str, dict[str, str]] = {
    "en": {
        "language_name": "English",
        "help": "Help",
        "help_heading": "How can we help?",
        "search_label": "Search the help centre",
        "search_placeholder": "e.g. returns, invoice",
        "search_button": "Search",
        "results_for": "Results for “{q}”",
        "results_count": "{n} article(s) found.",
        "no_results": "Nothing found. Try other words, or browse the topics below.",
        "query_truncated": "Only the first {n} characters of your search were used.",
        "browse": "Browse by topic",
        "back_to_help": "All help topics",
        "external": "More on our website",
        "email_heading": "Email me this",
        "email_label": "Your email address",
        "email_button": "Send",
        "email_note": "We use your address only to send you this article.",
        "sent_heading": "Sent: check your inbox",
        "sent_body": "We have emailed you a link to “{title}”. It may take a few minutes to arrive; "
                     "if you cannot find it, look in your spam folder.",
        "back_to_article": "Back to the article",
        "refused_title": "Not sent",
        "refused_invalid": "That does not look like an email address. Check it and try again.",
        "refused_limit_address": "We have already sent several emails to this address in the last hour. "
                                 "Please try again later.",
        "refused_limit_global": "We are sending a lot of email right now. Please try again later.",
        "refused_unavailable": "Sending by email is not available right now.",
        "refused_other": "We could not send this email. Please try again later.",
        "rate_limited_title": "Too many requests",
        "rate_limited_body": "You have asked for many emails in a short time. Please try again later.",
        "forbidden_title": "Request refused",
        "csrf_body": "This form has expired or was not sent from our page, so it was not accepted. "
                     "Go back, reload the page and try again.",
        "origin_body": "This request did not come from our website, so it was refused.",
        "bad_form_title": "Incomplete form",
        "bad_form_body": "The form was incomplete. Go back, reload the page and try again.",
        "not_found_title": "Page not found",
        "not_found_body": "We could not find this page. It may have moved, or the address may be wrong.",
        "link_invalid_title": "This link is not valid",
        "link_invalid_body": "The link is incomplete or has been changed. Please open the whole link from your "
                             "message again.",
        "link_expired_title": "This link has expired",
        "link_expired_body": "Links in our messages work for a limited time. You can still find every answer "
                             "in the help centre.",
        "banner_call": "About your call on {when}",
        "banner_topic": "You asked about: {topic}",
        "survey_title": "How did we do?",
        "survey_question": "How happy are you with your call?",
        "survey_low": "1 = very unhappy",
        "survey_high": "5 = very happy",
        "survey_score": "{n} of 5",
        "survey_thanks_title": "Thank you!",
        "survey_thanks_body": "Your answer helps us to do better.",
        "survey_already_title": "Already answered",
        "survey_already_body": "This survey has already been answered. Thank you!",
        "survey_unavailable_body": "This survey is not available.",
        "unavailable_title": "Help is not available",
        "unavailable_body": "The help centre is not available right now. Please try again in a few minutes.",
        "error_title": "Something went wrong",
        "error_body": "Sorry, something went wrong on our side. Please try again in a moment.",
        "dev_title": "Outbox (development)",
        "dev_counts": "Follow-ups by state",
        "dev_latest": "Latest follow-ups",
        "dev_received": "Received by the development sinks",
        "dev_none": "Nothing yet.",
        "dev_no_sinks": "No development sinks are running.",
        "dev_refresh": "This page refreshes every 5 seconds.",
        "col_time": "Time",
        "col_channel": "Channel",
        "col_recipient": "Recipient",
        "col_state": "State",
        "col_reason": "Reason",
        "col_attempts": "Attempts",
    },
    "zh-CN": {
        "language_name": "中文",
        "help": "帮助",
        "help_heading": "有什么可以帮您？",
        "search_label": "搜索帮助中心",
        "search_placeholder": "例如：退货、发票",
        "search_button": "搜索",
        "results_for": "“{q}”的搜索结果",
        "results_count": "找到 {n} 篇文章。",
        "no_results": "没有找到相关内容。请换个说法，或按下方主题浏览。",
        "query_truncated": "只使用了搜索内容的前 {n} 个字符。",
        "browse": "按主题浏览",
        "back_to_help": "全部帮助主题",
        "external": "在我们的网站上了解更多",
        "email_heading": "通过邮件发给我",
        "email_label": "您的电子邮箱",
        "email_button": "发送",
        "email_note": "您的邮箱仅用于发送这篇文章。",
        "sent_heading": "已发送，请查收邮件",
        "sent_body": "我们已将“{title}”的链接发送到您的邮箱。邮件可能需要几分钟才能送达；"
                     "如果找不到，请查看垃圾邮件文件夹。",
        "back_to_article": "返回文章",
        "refused_title": "未发送",
        "refused_invalid": "这个电子邮箱地址似乎不正确。请检查后重试。",
        "refused_limit_address": "过去一小时内我们已向这个邮箱发送了多封邮件。请稍后再试。",
        "refused_limit_global": "我们当前发送的邮件较多。请稍后再试。",
        "refused_unavailable": "目前无法通过邮件发送。",
        "refused_other": "我们无法发送这封邮件。请稍后再试。",
        "rate_limited_title": "请求过多",
        "rate_limited_body": "您在短时间内请求了多封邮件。请稍后再试。",
        "forbidden_title": "请求被拒绝",
        "csrf_body": "该表单已过期或并非从我们的页面提交，因此未被接受。请返回并刷新页面后重试。",
        "origin_body": "该请求并非来自我们的网站，因此被拒绝。",
        "bad_form_title": "表单不完整",
        "bad_form_body": "表单不完整。请返回并刷新页面后重试。",
        "not_found_title": "找不到页面",
        "not_found_body": "我们找不到这个页面。它可能已被移动，或网址有误。",
        "link_invalid_title": "链接无效",
        "link_invalid_body": "该链接不完整或已被更改。请重新打开消息中的完整链接。",
        "link_expired_title": "链接已过期",
        "link_expired_body": "消息中的链接在一段时间内有效。您仍可在帮助中心找到所有解答。",
        "banner_call": "关于您在 {when} 的来电",
        "banner_topic": "您咨询的问题：{topic}",
        "survey_title": "请为我们的服务评分",
        "survey_question": "您对本次通话满意吗？",
        "survey_low": "1 = 非常不满意",
        "survey_high": "5 = 非常满意",
        "survey_score": "{n} 分（满分 5 分）",
        "survey_thanks_title": "谢谢！",
        "survey_thanks_body": "您的评价将帮助我们做得更好。",
        "survey_already_title": "已评价",
        "survey_already_body": "此调查已经有人回答过了。谢谢！",
        "survey_unavailable_body": "此调查不可用。",
        "unavailable_title": "帮助中心暂不可用",
        "unavailable_body": "帮助中心目前无法使用。请几分钟后再试。",
        "error_title": "出错了",
        "error_body": "抱歉，我们这边出了点问题。请稍后再试。",
        "dev_title": "发件箱（开发用）",
        "dev_counts": "各状态的跟进消息数",
        "dev_latest": "最新的跟进消息",
        "dev_received": "开发用接收端收到的内容",
        "dev_none": "暂无内容。",
        "dev_no_sinks": "没有运行开发用接收端。",
        "dev_refresh": "本页每 5 秒刷新一次。",
        "col_time": "时间",
        "col_channel": "渠道",
        "col_recipient": "收件人",
        "col_state": "状态",
        "col_reason": "原因",
        "col_attempts": "尝试次数",
    },
}


def normalise(tag: str | None) -> str | None:
    """A UI language for a language tag (``zh``, ``zh-Hans-CN``, ``EN-gb``), or None."""
    if not tag:
        return None
    tag = tag.strip().lower().replace("_", "-")
    if tag[:2] == "zh":
        return "zh-CN"
    if tag[:2] == "en":
        return "en"
    return None


def from_accept_language(header: str | None) -> str | None:
    """The best UI language an ``Accept-Language`` header asks for (q-values honoured), or None."""
    if not header:
        return None
    choices: list[tuple[float, int, str]] = []
    for index, part in enumerate(header[:512].split(",")):
        tag, _, params = part.partition(";")
        quality = 1.0
        params = params.strip()
        if params.startswith("q="):
            try:
                quality = float(params[2:])
            except ValueError:
                quality = 0.0
        language = normalise(tag)
        if language is not None and quality > 0:
            choices.append((-quality, index, language))
    return min(choices)[2] if choices else None


def pick(query: Mapping[str, str], cookies: Mapping[str, str], accept_language: str | None,
         hint: str | None = None) -> str:
    """The UI language for a request (see the module doc)."""
    for candidate in (query.get("lang"), cookies.get("lang"), hint):
        language = normalise(candidate)
        if language is not None:
            return language
    return from_accept_language(accept_language) or DEFAULT


def other(language: str) -> str:
    """The language the switch link on a page offers."""
    return next(code for code in LANGUAGES if code != language)
